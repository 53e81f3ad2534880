"""``thaw run`` refuses a recipe it can tell is wrong before any training step: exit 2, one line naming the key, its
value and what is valid, no traceback, and nothing written (no save folder, no checkpoint). One case per mistake,
from the recipe alone, from the files it names, and from the model it builds."""

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from support import REPO, set_args

from composer_thaw.cli import EXIT_INVALID, main

DEMO = REPO / 'yamls/demo.yaml'
# The built-in decoder for 2 batches: what a case does not change trains quickly.
TINY = [
    'model.name=tiny-decoder',
    'data.name=python-topics',
    'data.max_seq_len=32',
    'algorithms={}',
    'max_duration=2ba',
    'global_train_batch_size=4',
    'data.max_train_samples=16',
    'data.max_eval_samples=8',
    'progress_bar=false',
]
# A classifier loaded from a local folder (see `checkpoint_folders`) instead of the decoder.
FROM_FOLDER = ['model.name=hf', 'data.name=stdlib-docs', 'algorithms={}']

Case = Callable[[Path, dict[str, Path]], list[str]]  # (tmp_path, model folders) -> overrides


def _fixed(*overrides: str) -> Case:
    return lambda tmp_path, folders: list(overrides)


def _file(content: bytes, key: str = 'load_path', *more: str) -> Case:
    def build(tmp_path: Path, folders: dict[str, Path]) -> list[str]:
        path = tmp_path / 'given'
        path.write_bytes(content)
        return [f'{key}={path}', *more]

    return build


def _truncated_checkpoint(tmp_path: Path, folders: dict[str, Path]) -> list[str]:
    import torch

    path = tmp_path / 'ep1-ba4-rank0.pt'
    torch.save({'state': {'model': {'w': torch.zeros(1000)}}}, path)
    path.write_bytes(path.read_bytes()[:-200])  # killed during the save
    return [f'load_path={path}']


def _whole_checkpoint_in_a_sharded_run(tmp_path: Path, folders: dict[str, Path]) -> list[str]:
    """A whole-model checkpoint file given to a run that reads sharded checkpoints (state_dict_type: sharded)."""
    import torch

    path = tmp_path / 'ep1-ba4-rank0.pt'
    torch.save({'state': {'model': {'w': torch.zeros(4)}}}, path)
    return ['parallelism={fsdp: {}}', f'load_path={path}']


def _resumed_with_another_rank(tmp_path: Path, folders: dict[str, Path]) -> list[str]:
    """A checkpoint written with LoRA r=8 (thaw run reads its recorded state before building), resumed with r=16."""
    import torch

    from composer_thaw import LoRAInject

    path = tmp_path / 'ep0-ba2-rank0.pt'
    torch.save({'state': {'algorithms': [('LoRAInject', LoRAInject(r=8).state_dict())], 'model': {}}}, path)
    return ['algorithms={lora_inject: {r: 16}}', f'load_path={path}']


def _lora_resumed_on_other_frozen_weights(tmp_path: Path, folders: dict[str, Path]) -> list[str]:
    """A LoRA run's adapter-only checkpoint, resumed on a base built from another seed: its frozen weights differ."""
    lora = 'algorithms={lora_inject: {r: 4, target_modules: [q_proj, v_proj]}}'
    saved = tmp_path / 'saved'
    assert main(['run', str(DEMO), *set_args([*TINY, lora, 'max_duration=1ba', f'save_folder={saved}'])]) == 0
    return [lora, 'seed=18', f'load_path={saved / "ep0-ba1-rank0.pt"}']


def _json_lines_with_a_number_for_a_text(tmp_path: Path, folders: dict[str, Path]) -> list[str]:
    """A JSONL whose second row has a number where the first has a text: datasets' reader logs it too."""
    path = tmp_path / 'train.jsonl'
    path.write_text('{"text": "hello world"}\n{"text": 5}\n')
    return ['data.name=files', 'data.task=causal_lm', f'data.train={path}', 'data.eval_fraction=0.5']


def _only_incomplete_checkpoints(*resuming: str) -> Case:
    """A save folder whose latest checkpoint a killed save cut short, with no complete one to fall back to."""

    def build(tmp_path: Path, folders: dict[str, Path]) -> list[str]:
        runs = tmp_path / 'runs'
        runs.mkdir()
        _truncated_checkpoint(runs, folders)
        (runs / 'latest-rank0.pt').symlink_to('ep1-ba4-rank0.pt')
        return [r.format(runs=runs) for r in resuming]

    return build


def _model_folder(name: str) -> Case:
    return lambda tmp_path, folders: [*FROM_FOLDER, f'model.path={folders[name]}']


def _under_a_file(tmp_path: Path, folders: dict[str, Path]) -> list[str]:
    (tmp_path / 'a-file').write_text('')
    return [f'save_folder={tmp_path / "a-file" / "runs"}']


def _missing_logger_package() -> list[str]:
    return [name for name in ('wandb', 'mlflow', 'tensorboard') if importlib.util.find_spec(name) is None]


CASES: dict[str, tuple[Case, str]] = {
    # the recipe alone
    'max_duration of 0': (_fixed('max_duration=0'), 'max_duration'),
    'negative max_duration': (_fixed('max_duration=-2'), 'max_duration'),
    'max_duration of 1.5ep': (_fixed('max_duration=1.5ep'), 'max_duration'),
    'max_duration as a fraction of itself': (_fixed('max_duration=0.5dur'), 'max_duration'),
    'max_duration as a float': (_fixed('max_duration=0.5'), 'max_duration'),
    'save_interval of 0': (_fixed('save_interval=0'), 'save_interval'),
    'eval_interval of 0': (_fixed('eval_interval=0'), 'eval_interval'),
    'lr nan': (_fixed('optimizer.lr=.nan'), 'optimizer.lr'),
    'lr inf': (_fixed('optimizer.lr=.inf'), 'optimizer.lr'),
    'lr 1e9': (_fixed('optimizer.lr=1e9'), 'optimizer.lr'),
    'autoresume without run_name': (_fixed('autoresume=true'), 'autoresume'),
    'broken YAML in --set': (_fixed('optimizer.lr=[1e-4'), '--set'),
    # files the recipe names
    'save_folder under a file': (_under_a_file, 'save_folder'),
    'save_folder not writable': (_fixed('save_folder=/proc/thaw-cannot-write-here/runs'), 'save_folder'),
    'empty load_path file': (_file(b''), 'load_path'),
    'text file as load_path': (_file(b'not a checkpoint\n'), 'load_path'),
    'truncated load_path': (_truncated_checkpoint, 'load_path'),
    'folder as load_path': (lambda tmp_path, folders: [f'load_path={tmp_path}'], 'load_path'),
    'whole checkpoint file in a sharded run': (_whole_checkpoint_in_a_sharded_run, 'load_path'),
    'resume with another LoRA r': (_resumed_with_another_rank, 'algorithms.lora_inject.r'),
    'LoRA checkpoint on other frozen weights': (_lora_resumed_on_other_frozen_weights, 'load_path'),
    'JSON lines with a wrongly typed row': (_json_lines_with_a_number_for_a_text, 'data.train'),
    'autoresume with only an incomplete checkpoint': (
        _only_incomplete_checkpoints('run_name=r', 'autoresume=true'),
        'autoresume',
    ),
    'latest link to an incomplete checkpoint': (
        _only_incomplete_checkpoints('load_path={runs}/latest-rank0.pt'),
        'load_path',
    ),
    'model folder with a broken config.json': (_model_folder('bad config'), 'model.path'),
    'model folder without weights': (_model_folder('no weights'), 'model.path'),
    'model folder without a tokenizer': (_model_folder('no tokenizer'), 'model.path'),
    'model folder with truncated weights': (_model_folder('truncated weights'), 'model.path'),
    # the model
    'sequence longer than the positions': (_fixed('data.max_seq_len=4096'), 'data.max_seq_len'),
    'RegexFreeze pattern matching nothing': (
        _fixed('algorithms={regex_freeze: {trainable: [lm_haed]}}'),
        'algorithms.regex_freeze',
    ),
    'RegexFreeze rows past the end': (
        _fixed('algorithms={regex_freeze: {trainable: ["model.embed_tokens.weight[30000:40000]"]}}'),
        'algorithms.regex_freeze',
    ),
    'nothing left to train': (_fixed('algorithms={regex_freeze: {trainable: []}}'), 'algorithms'),
    'LoRA targets naming nothing': (
        _fixed('algorithms={lora_inject: {target_modules: [q_prj]}}'),
        'algorithms.lora_inject',
    ),
    'LoRA modules_to_save naming nothing': (
        _fixed('algorithms={lora_inject: {target_modules: [q_proj], modules_to_save: [lm_haed]}}'),
        'algorithms.lora_inject',
    ),
    'LoRA on a norm': (
        _fixed('algorithms={lora_inject: {target_modules: [input_layernorm]}}'),
        'algorithms.lora_inject',
    ),
    'HiFT group_size larger than the model': (
        _fixed('algorithms={hift_rotation: {group_size: 99}}'),
        'algorithms.hift_rotation',
    ),
    'HiFT unknown always_trainable': (
        _fixed('algorithms={hift_rotation: {always_trainable: [lm_haed]}}'),
        'algorithms.hift_rotation',
    ),
    'HiFT lora without LoRAInject': (_fixed('algorithms={hift_rotation: {lora: true}}'), 'algorithms.hift_rotation'),
}
missing = _missing_logger_package()
if missing:
    CASES['logger whose package is missing'] = (_fixed(f'loggers={{{missing[0]}: {{}}}}'), f'loggers.{missing[0]}')


@pytest.fixture(scope='module')
def checkpoint_folders(tmp_path_factory) -> dict[str, Path]:
    """A small BERT classifier saved as Hugging Face does, and copies of it broken in the ways users meet."""
    from transformers import BertConfig, BertForSequenceClassification

    from composer_thaw.models.builtin import load_tokenizer

    root = tmp_path_factory.mktemp('models')
    good = root / 'good'
    config = BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64)
    BertForSequenceClassification(config).save_pretrained(good)
    load_tokenizer().save_pretrained(good)

    def broken(name: str, edit: Callable[[Path], object]) -> Path:
        folder = root / name.replace(' ', '-')
        shutil.copytree(good, folder)
        edit(folder)
        return folder

    weights = 'model.safetensors'
    return {
        'good': good,
        'bad config': broken('bad config', lambda f: (f / 'config.json').write_text('{"model_type": "bert", ')),
        'no weights': broken('no weights', lambda f: (f / weights).unlink()),
        'no tokenizer': broken(
            'no tokenizer', lambda f: [p.unlink() for p in f.iterdir() if 'token' in p.name or p.name == 'vocab.txt']
        ),
        'truncated weights': broken('truncated weights', lambda f: (f / weights).write_bytes(b'\x08' * 64)),
        'broken tokenizer': broken('broken tokenizer', lambda f: (f / 'tokenizer.json').write_text('{"broken": ')),
    }


@pytest.mark.parametrize('name', list(CASES))
def test_refused_before_training_in_one_line(name, tmp_path, checkpoint_folders, capsys):
    build, key = CASES[name]
    overrides = [*TINY, f'save_folder={tmp_path / "runs"}', *build(tmp_path, checkpoint_folders)]
    before = sorted(tmp_path.rglob('*'))
    code = main(['run', str(DEMO), *set_args(overrides)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == EXIT_INVALID, captured.err[-2000:]
    what = 'option' if key.startswith('--') else 'recipe'  # a command-line option (--set), or the recipe's key
    assert len(lines) == 1 and lines[0].startswith(f'thaw run: invalid {what}: {key} = '), captured.err[-2000:]
    assert 'Traceback' not in captured.err + captured.out
    assert sorted(tmp_path.rglob('*')) == before, 'a refused run wrote files'


def _recipe_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / 'recipe.yaml'
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    'text, problem',
    [('', 'the file is empty'), ('seed: 1\nmax_duration: 2ba\nseed: 2\n', "key 'seed' appears twice (lines 1 and 3)")],
    ids=['empty recipe', 'duplicate key'],
)
def test_recipe_files_that_would_train_something_else_are_refused(text, problem, tmp_path, capsys):
    assert main(['run', str(_recipe_file(tmp_path, text))]) == EXIT_INVALID
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('thaw run: invalid recipe: recipe = ') and problem in lines[0]


# The previews build the recipe's model as `thaw run` does and refuse what it refuses, with the same one line.
PREVIEWED = {
    'freeze-preview': [
        'max_duration of 0',
        'model folder with a broken config.json',
        'model folder without weights',
        'model folder without a tokenizer',
        'model folder with truncated weights',
        'sequence longer than the positions',
        'RegexFreeze pattern matching nothing',
        'RegexFreeze rows past the end',
    ],
    'hift-preview': ['HiFT group_size larger than the model', 'HiFT unknown always_trainable'],
}


@pytest.mark.parametrize('command, name', [(command, name) for command, names in PREVIEWED.items() for name in names])
def test_previews_refuse_what_the_run_refuses_in_the_same_line(command, name, tmp_path, checkpoint_folders, capsys):
    import yaml

    from composer_thaw.recipes.schema import apply_overrides

    build, key = CASES[name]
    recipe = apply_overrides(yaml.safe_load(DEMO.read_text()), [*TINY, *build(tmp_path, checkpoint_folders)])
    path = tmp_path / 'recipe.yaml'
    path.write_text(yaml.safe_dump(recipe))
    code = main([command, str(path)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == EXIT_INVALID, captured.err[-2000:]
    assert len(lines) == 1 and lines[0].startswith(f'thaw {command}: invalid recipe: {key} = '), captured.err[-2000:]
    assert 'Traceback' not in captured.err + captured.out


def _jsonl(tmp_path: Path, text: str, *overrides: str) -> list[str]:
    path = tmp_path / 'train.jsonl'
    path.write_text(text)
    return ['data.name=files', f'data.train={path}', 'data.eval_fraction=0.5', *overrides]


def _in_folder(name: str, *overrides: str) -> Case:
    return lambda tmp_path, folders: [*FROM_FOLDER, f'model.path={folders[name]}', *overrides]


# Problems in the files a recipe names, each refused from the files alone (issue #25).
FILE_CASES: dict[str, tuple[Case, str, str]] = {
    'a wrongly typed JSON row': (
        lambda tmp_path, folders: _jsonl(tmp_path, '{"text": "hello world"}\n{"text": 5}\n', 'data.task=causal_lm'),
        'data.train',
        'JSON parse error',
    ),
    'a missing text column': (
        lambda tmp_path, folders: _jsonl(
            tmp_path, '{"txt": "a", "label": 0}\n{"txt": "b", "label": 1}\n', 'data.task=classification'
        ),
        'data.text_column',
        'its columns: txt, label',
    ),
    'a single label': (
        lambda tmp_path, folders: _jsonl(
            tmp_path, '{"text": "a", "label": 0}\n{"text": "b", "label": 0}\n', 'data.task=classification'
        ),
        'data.label_column',
        'a classifier needs two or more',
    ),
    'an eval label training lacks': (
        lambda tmp_path, folders: [
            *_jsonl(tmp_path, '{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n', 'data.task=classification'),
            'data.eval_fraction=null',
            'data.eval=' + str(_write(tmp_path / 'eval.jsonl', '{"text": "c", "label": 2}')),
        ],
        'data.label_column',
        'which the training data does not have',
    ),
    'chat messages without an assistant turn': (
        lambda tmp_path, folders: _jsonl(
            tmp_path,
            '{"messages": [{"role": "user", "content": "hi"}]}\n' * 2,
            'data.task=instruction',
            'data.messages_column=messages',
        ),
        'data.messages_column',
        'no assistant message',
    ),
    'a tokenizer without a chat template for chat messages': (
        lambda tmp_path, folders: [
            *_in_folder('good')(tmp_path, folders),
            *_jsonl(
                tmp_path,
                '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}\n' * 2,
                'data.task=instruction',
                'data.messages_column=messages',
            ),
        ],
        'data.messages_column',
        'need a tokenizer with a chat template',
    ),
    'a sequence longer than the model folder allows': (
        _in_folder('good', 'data.max_seq_len=4096'),
        'data.max_seq_len',
        'the model has 512 positions',
    ),
    'a model folder without weights': (_in_folder('no weights'), 'model.path', 'no weights there'),
    'a model folder with truncated weights': (_in_folder('truncated weights'), 'model.path', 'model.safetensors'),
    'a model folder without a tokenizer': (_in_folder('no tokenizer'), 'model.path', 'no tokenizer loads from there'),
    'a model folder with a broken config.json': (_in_folder('bad config'), 'model.path', 'config.json'),
    'a model folder with a broken tokenizer.json': (
        _in_folder('broken tokenizer'),
        'model.path',
        'tokenizer.json is not readable JSON',
    ),
}


def _write(path: Path, text: str) -> Path:
    path.write_text(text + '\n')
    return path


@pytest.mark.parametrize('name', list(FILE_CASES))
def test_a_bad_file_is_refused_before_composer_or_transformers_is_imported(name, tmp_path, checkpoint_folders):
    """Issue #25: file-level checks come first, so a bad file is refused in about a second (Composer's import alone
    takes 10-20 s, torch's and transformers' a few seconds each): run with Composer made unimportable, the refusal
    is still the one line, exit 2, nothing is written, and neither torch nor transformers was imported."""
    import subprocess
    import sys

    build, key, fragment = FILE_CASES[name]
    overrides = [*TINY, f'save_folder={tmp_path / "runs"}', *build(tmp_path, checkpoint_folders)]
    script = (
        'import sys\n'
        "sys.modules['composer'] = None  # importing it now raises ImportError\n"
        'from composer_thaw.cli import main\n'
        f'code = main({["run", str(DEMO), *set_args(overrides)]!r})\n'
        "print(sorted({'torch', 'transformers'} & set(sys.modules)))\n"
        'sys.exit(code)\n'
    )
    before = sorted(tmp_path.rglob('*'))
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120, cwd=REPO)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == EXIT_INVALID, done.stderr[-2000:]
    assert lines == [lines[0]] and lines[0].startswith(f'thaw run: invalid recipe: {key} = '), done.stderr
    assert fragment in lines[0]
    assert done.stdout.strip() == '[]', f'imported before refusing: {done.stdout.strip()}'
    assert sorted(tmp_path.rglob('*')) == before, 'a refused run wrote files'
