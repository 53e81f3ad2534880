"""A recipe trains your own local checkpoint on your own local files: a causal LM folder on prompt/response pairs
with each algorithm, and a decoder without a pad token as a 3-label classifier on a CSV. The previews and
``thaw estimate`` see the model the run builds, and refuse what the run refuses, in the same one line."""

import json
from pathlib import Path

import pytest
import torch
from composer.utils import reproducibility

from composer_thaw.cli import EXIT_INVALID, main
from composer_thaw.datasets.local_files import IGNORE_INDEX
from composer_thaw.models.builtin import tiny_decoder
from composer_thaw.recipes.building import build_recipe_model
from composer_thaw.recipes.running import run_recipe
from composer_thaw.recipes.schema import load_recipe

LABELS = ('negative', 'neutral', 'positive')
WORDS = 'good great fine okay bad awful the movie was food service very quite'.split()


def _decoder_folder(root: Path) -> Path:
    """The built-in tiny decoder saved as Hugging Face saves a checkpoint, with its tokenizer."""
    reproducibility.seed_all(0)
    model = tiny_decoder(num_layers=2, hidden_size=32, num_heads=2)
    model.model.save_pretrained(root / 'decoder')
    model.tokenizer.save_pretrained(root / 'decoder')
    return root / 'decoder'


def _unpadded_decoder_folder(root: Path) -> Path:
    """A LLaMA-style decoder whose tokenizer, like GPT-2's and LLaMA's, has an end-of-text token but no pad token."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(['<unk>', '</s>', *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token='<unk>', eos_token='</s>')
    assert tokenizer.pad_token is None
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
        eos_token_id=1,
        pad_token_id=None,
    )
    reproducibility.seed_all(0)
    LlamaForCausalLM(config).save_pretrained(root / 'unpadded')
    tokenizer.save_pretrained(root / 'unpadded')
    return root / 'unpadded'


@pytest.fixture(scope='module')
def files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp('own-data')
    pairs = [{'prompt': f'What is {i} plus {i}?', 'response': f'It is {2 * i}.'} for i in range(10)]
    (root / 'pairs.jsonl').write_text(''.join(json.dumps(pair) + '\n' for pair in pairs))
    reviews = [f'the {WORDS[i % 3 + 7]} was {WORDS[i % 6]},{LABELS[(i % 6) // 2]}' for i in range(12)]
    (root / 'train.csv').write_text('text,sentiment\n' + '\n'.join(reviews) + '\n')
    (root / 'eval.csv').write_text('text,sentiment\nthe food was good,negative\nthe movie was awful,positive\n')
    return {'decoder': _decoder_folder(root), 'unpadded': _unpadded_decoder_folder(root), 'root': root}


def _recipe(root: Path, name: str, text: str) -> Path:
    path = root / f'{name}.yaml'
    path.write_text(text)
    return path


def _instruction_recipe(files: dict[str, Path]) -> Path:
    # 4 training pairs, one batch: 2 epochs are 2 steps, and LayerFreezing freezes at the end of the first.
    return _recipe(
        files['root'],
        'instruction',
        f"""
model: {{name: hf, path: {files['decoder']}}}
data: {{name: files, task: instruction, train: {files['root'] / 'pairs.jsonl'}, eval_fraction: 0.2, max_seq_len: 24,
       max_train_samples: 4}}
optimizer: {{name: adamw, lr: 1.0e-3}}
max_duration: 2ep
eval_interval: 2ep
global_train_batch_size: 4
progress_bar: false
""",
    )


ALGORITHMS = {
    'layer_freezing': '{layer_freezing: {freeze_start: 0.0, freeze_level: 0.5}}',
    'regex_freeze': '{regex_freeze: {trainable: [model.layers.1, lm_head]}}',
    'hift_rotation': '{hift_rotation: {group_size: 2}}',
    'lora_inject': '{lora_inject: {r: 4, target_modules: [q_proj, v_proj]}}',
}


@pytest.mark.parametrize('algorithm', list(ALGORITHMS))
def test_a_local_causal_lm_folder_fine_tunes_on_prompt_response_pairs(algorithm, files):
    recipe = load_recipe(_instruction_recipe(files), [f'algorithms={ALGORITHMS[algorithm]}'])
    summary = run_recipe(recipe)
    assert summary.train_batches == 2
    assert 0 < summary.trainable_params < summary.total_params
    assert torch.isfinite(torch.tensor(summary.eval_metrics['eval/LanguageCrossEntropy']))


def test_the_run_builds_the_folders_causal_lm_and_learns_only_responses(files):
    built = build_recipe_model(load_recipe(_instruction_recipe(files)))
    assert type(built.model.model).__name__ == 'LlamaForCausalLM'
    batch = next(iter(built.data.train_dataloader))
    learned = batch['labels'] != IGNORE_INDEX
    assert learned.any() and not learned.all()
    texts = [built.tokenizer.decode(ids[mask]) for ids, mask in zip(batch['input_ids'], learned)]
    assert all(text.startswith('it is ') and text.endswith('. [SEP]') for text in texts), texts


def _classifier_recipe(files: dict[str, Path], summary: Path) -> Path:
    root = files['root']
    return _recipe(
        root,
        'classifier',
        f"""
model: {{name: hf, path: {files['unpadded']}}}
data:
  name: files
  task: classification
  train: {root / 'train.csv'}
  eval: {root / 'eval.csv'}
  label_column: sentiment
  max_seq_len: 16
optimizer: {{name: adamw, lr: 1.0e-3}}
max_duration: 2ba
eval_interval: 2ba
global_train_batch_size: 4
progress_bar: false
summary_path: {summary}
algorithms:
  regex_freeze: {{trainable: [model.layers.1, score]}}
""",
    )


def test_a_decoder_without_a_pad_token_classifies_three_labels_from_a_csv(files, tmp_path, capsys):
    recipe_path = _classifier_recipe(files, tmp_path / 'summary.json')
    assert main(['run', str(recipe_path)]) == 0, capsys.readouterr().err[-2000:]
    summary = json.loads((tmp_path / 'summary.json').read_text())
    assert summary['train_batches'] == 2 and 0.0 <= summary['eval_metrics']['eval/MulticlassAccuracy'] <= 1.0
    built = build_recipe_model(load_recipe(recipe_path))
    model, tokenizer = built.model.model, built.tokenizer
    assert type(model).__name__ == 'LlamaForSequenceClassification'
    assert model.score.weight.shape == (3, 32)
    assert model.config.id2label == dict(enumerate(LABELS)) and model.config.label2id['neutral'] == 1
    assert tokenizer.pad_token == '</s>' and model.config.pad_token_id == tokenizer.pad_token_id == 1


def test_previews_and_the_estimate_see_the_model_the_run_builds(files, tmp_path, capsys):
    recipe_path = str(_classifier_recipe(files, tmp_path / 'summary.json'))
    built = build_recipe_model(load_recipe(recipe_path)).model
    assert main(['freeze-preview', recipe_path]) == 0
    table = capsys.readouterr().out
    rows = {line.split()[0]: line.split()[1:] for line in table.splitlines() if line.strip()}
    assert rows['score'] == ['96', '96', 'all']  # 3 labels x 32 hidden, trained (regex_freeze.trainable)
    assert rows['total'][1] == f'{sum(p.numel() for p in built.parameters()):,}'
    assert main(['estimate', '--model-config', recipe_path]) == 0
    assert f'{sum(p.numel() for p in built.parameters()):,} parameters' in capsys.readouterr().out


BROKEN = {
    'an unknown eval label': (['data.eval={eval}'], 'data.label_column', "label 'awful'"),
    'a missing column': (['data.text_column=review'], 'data.text_column', 'its columns: text, sentiment'),
    'an empty training file': (['data.train={empty}'], 'data.train', 'the file is empty'),
    'no eval source': (['data.eval=null'], 'data.eval', 'not neither'),
}


@pytest.mark.parametrize('case', list(BROKEN))
@pytest.mark.parametrize('command', ['run', 'freeze-preview', 'hift-preview'])
def test_bad_data_is_refused_in_one_line_before_the_model_is_built(case, command, files, tmp_path, capsys, monkeypatch):
    import yaml

    import composer_thaw.models.builtin
    from composer_thaw.recipes.schema import apply_overrides

    def no_model(*args, **kwargs):
        raise AssertionError('the model was built')

    monkeypatch.setattr(composer_thaw.models.builtin, 'hf_model', no_model)
    (tmp_path / 'eval.csv').write_text('text,sentiment\nthe food was awful,awful\n')
    (tmp_path / 'empty.csv').write_text('')
    overrides, key, fragment = BROKEN[case]
    overrides = [o.format(eval=tmp_path / 'eval.csv', empty=tmp_path / 'empty.csv') for o in overrides]
    recipe_path = _classifier_recipe(files, tmp_path / 'summary.json')
    recipe_path.write_text(yaml.safe_dump(apply_overrides(yaml.safe_load(recipe_path.read_text()), overrides)))
    code = main([command, str(recipe_path)])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == EXIT_INVALID and len(lines) == 1, captured.err[-2000:]
    assert lines[0].startswith(f'thaw {command}: invalid recipe: {key} = ') and fragment in lines[0]
    assert 'Traceback' not in captured.out + captured.err
    assert not (tmp_path / 'summary.json').exists()


def test_the_estimate_of_a_builtin_model_recipe_has_the_datas_classes(capsys, monkeypatch):
    from support import REPO

    from composer_thaw.recipes.memory_estimate import estimate_training_state

    monkeypatch.chdir(REPO)
    assert main(['estimate', '--model-config', 'yamls/files_classification.yaml']) == 0
    six_labels = estimate_training_state('minilm').total_params  # the built-in task's head
    assert f'{six_labels - 3 * (384 + 1):,} parameters' in capsys.readouterr().out  # 3 classes: function, ...
