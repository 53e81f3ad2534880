"""Faults during or between runs lose no work and say what to do: an interrupted run says how to resume, autoresume
skips a checkpoint a killed save left incomplete, and resuming with another rotation is refused (or starts anew from
the weights only, when asked)."""

import pytest
from support import REPO, set_args

from composer_thaw.cli import EXIT_INTERRUPTED, EXIT_INVALID, main
from composer_thaw.recipes.running import run_recipe
from composer_thaw.recipes.schema import load_recipe

DEMO = REPO / 'yamls/demo.yaml'
TINY = [
    'model.name=tiny-decoder',
    'data.name=python-topics',
    'data.max_seq_len=32',
    'global_train_batch_size=4',
    'data.max_train_samples=16',
    'data.max_eval_samples=8',
    'progress_bar=false',
    'eval_interval=100ba',
]


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize(
    'extra, advice',
    [
        ([], 'set save_folder to be able to resume'),
        (['save_folder={tmp}/runs'], 'No checkpoint was written'),
        (['save_folder={tmp}/saved'], '--set load_path={tmp}/saved/latest-rank0.pt'),
        (['save_folder={tmp}/saved', 'run_name=r'], '--set autoresume=true'),
    ],
    ids=['nothing saved', 'nothing saved yet', 'saved', 'saved with a run name'],
)
def test_an_interrupted_run_says_how_to_resume(extra, advice, tmp_path, monkeypatch, capsys):
    (tmp_path / 'saved').mkdir()
    (tmp_path / 'saved' / 'latest-rank0.pt').write_bytes(b'')
    monkeypatch.setattr('composer_thaw.recipes.running.run_recipe', _interrupt)
    overrides = [*TINY, 'algorithms={}', *[e.format(tmp=tmp_path) for e in extra]]
    assert main(['run', str(DEMO), *set_args(overrides)]) == EXIT_INTERRUPTED
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('thaw run: interrupted.')
    assert advice.format(tmp=tmp_path) in lines[0]


def test_autoresume_skips_a_checkpoint_a_killed_save_left_incomplete(tmp_path):
    saving = [*TINY, 'algorithms={}', f'save_folder={tmp_path}', 'run_name=faulty', 'save_interval=1ba']
    run_recipe(load_recipe(DEMO, [*saving, 'max_duration=2ba']))
    latest = tmp_path / 'latest-rank0.pt'
    killed = latest.resolve()
    assert killed.name == 'ep0-ba2-rank0.pt'
    killed.write_bytes(killed.read_bytes()[: killed.stat().st_size // 2])  # the process died while writing it
    with pytest.warns(UserWarning, match='ep0-ba2-rank0.pt is incomplete .* resuming from ep0-ba1-rank0.pt'):
        resumed = run_recipe(load_recipe(DEMO, [*saving, 'max_duration=3ba', 'autoresume=true']))
    assert (resumed.batches_run, resumed.train_batches) == (2, 3)  # from batch 1, not from scratch


def test_resuming_with_another_rotation_is_refused_and_weights_only_starts_anew(tmp_path, capsys):
    first = [*TINY, 'algorithms={hift_rotation: {group_size: 2}}', 'max_duration=2ba']
    run_recipe(load_recipe(DEMO, [*first, f'save_folder={tmp_path}', 'save_interval=2ba']))
    checkpoint = tmp_path / 'ep0-ba2-rank0.pt'
    resumed = [*TINY, 'algorithms={hift_rotation: {group_size: 1}}', 'max_duration=3ba', f'load_path={checkpoint}']
    assert main(['run', str(DEMO), *set_args(resumed)]) == EXIT_INVALID
    lines = capsys.readouterr().err.strip().splitlines()
    refused = 'thaw run: invalid recipe: algorithms.hift_rotation.group_size = 1: '
    assert len(lines) == 1 and lines[0].startswith(refused)
    assert 'was trained with group_size = 2;' in lines[0] and 'load_weights_only: true' in lines[0]
    summary = run_recipe(load_recipe(DEMO, [*resumed, 'load_weights_only=true']))
    assert summary.batches_run == 3  # a new run from the checkpoint's weights
