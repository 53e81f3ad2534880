"""A recipe trains end to end under Composer and reports what it cost."""

import json
import re

import pytest
from support import REPO, two_process_part

from composer_thaw.recipes.running import format_summary, run_recipe
from composer_thaw.recipes.schema import load_recipe

SMALL = [
    'max_duration=4ba',
    'global_train_batch_size=8',
    'eval_batch_size=32',
    'data.max_train_samples=64',
    'data.max_eval_samples=32',
    'progress_bar=false',
]


def test_demo_recipe_runs_end_to_end_and_summarizes(tmp_path):
    summary = run_recipe(load_recipe(REPO / 'yamls/demo.yaml', SMALL + [f'summary_path={tmp_path}/s.json']))
    assert summary.train_batches == 4
    assert summary.total_params > 22_000_000
    assert 1_800_000 < summary.trainable_params < 0.1 * summary.total_params  # the demo trains the top layer only
    assert summary.param_bytes == 4 * summary.total_params
    # AdamW keeps two fp32 moments per trainable element (plus a scalar step per tensor), nothing for the rest
    trainable_bytes = 4 * summary.trainable_params
    assert 2 * trainable_bytes <= summary.optimizer_state_bytes < 2 * trainable_bytes + 4096
    assert summary.grad_bytes == trainable_bytes
    assert 0.0 <= summary.eval_metrics['eval/MulticlassAccuracy'] <= 1.0
    assert summary.samples_per_second > 0 and summary.peak_memory_bytes > summary.training_state_bytes
    table = format_summary(summary)
    for row in (
        'total parameters',
        'trainable parameters',
        'training-state bytes',
        'peak memory',
        'samples/s',
        'eval/MulticlassAccuracy',
        'majority-class rate',
    ):
        assert row in table
    assert (tmp_path / 's.json').exists()


def test_decoder_recipe_trains_and_reports_perplexity():
    summary = run_recipe(
        load_recipe(
            REPO / 'yamls/demo.yaml',
            SMALL + ['model.name=tiny-decoder', 'data.name=python-topics', 'data.max_seq_len=32', 'algorithms={}'],
        )
    )
    assert summary.eval_metrics['eval/LanguagePerplexity'] > 1.0


@pytest.mark.multiprocess
def test_a_sharded_recipe_holds_half_of_each_tensor_per_process(two_processes):
    """yamls/sharded_decoder.yaml, reduced, run by ``thaw run`` in each of 2 processes (tests/two_processes.py)."""
    sharded = json.loads((two_process_part(two_processes, 'sharded_recipe') / 'summary.json').read_text())
    assert sharded['world_size'] == 2
    # fp32, and every dim 0 of this model is even: half of each tensor per process
    assert sharded['param_bytes'] * 2 == 4 * sharded['total_params']
    assert 0 < sharded['grad_bytes'] * 2 < 4 * sharded['total_params']  # HiFT: one group's gradients
    # Adam's two moments of those gradients' shards, plus each tensor's 4-byte step count, held whole by every process
    assert 0 <= sharded['optimizer_state_bytes'] - 2 * sharded['grad_bytes'] <= 4 * 64


def test_a_resumed_recipe_replays_the_data_and_ends_bit_identical(tmp_path):
    decoder = [
        'model.name=tiny-decoder',
        'data.name=python-topics',
        'data.max_seq_len=32',
        'algorithms={}',
        'max_duration=6ba',
        'global_train_batch_size=4',
        'data.max_train_samples=40',
        'data.max_eval_samples=8',
        'progress_bar=false',
        'eval_interval=100ba',
    ]
    straight = run_recipe(load_recipe(REPO / 'yamls/demo.yaml', decoder))
    run_recipe(load_recipe(REPO / 'yamls/demo.yaml', decoder + [f'save_folder={tmp_path}', 'save_interval=2ba']))
    resumed = run_recipe(load_recipe(REPO / 'yamls/demo.yaml', decoder + [f'load_path={tmp_path}/ep0-ba4-rank0.pt']))
    assert (resumed.batches_run, resumed.train_batches) == (2, 6)
    assert resumed.param_checksums == straight.param_checksums
    assert straight.resumed_from is None and 'resumed from' not in format_summary(straight)
    assert (resumed.resumed_from, resumed.resumed_at_batch) == (f'{tmp_path}/ep0-ba4-rank0.pt', 4)
    table = format_summary(resumed)
    assert re.search(rf'\| resumed from +\| {re.escape(str(tmp_path))}/ep0-ba4-rank0.pt \(batch 4\)\n', table)
    assert re.search(r'\| train batches +\| 6\n\|   trained in this run +\| 2\n', table)


RECIPES = sorted((REPO / 'yamls').glob('*.yaml'))
REDUCED = [
    'max_duration=2ba',
    'global_train_batch_size=4',
    'eval_batch_size=8',
    'data.max_train_samples=16',
    'data.max_eval_samples=8',
    'eval_interval=2ba',
    'progress_bar=false',
]


@pytest.mark.parametrize('path', RECIPES, ids=[p.stem for p in RECIPES])
def test_every_shipped_recipe_trains_on_a_reduced_duration(path):
    summary = run_recipe(load_recipe(path, REDUCED))
    assert summary.train_batches == 2
    assert summary.eval_metrics
    if load_recipe(path).algorithms.keys() & {'lora_inject', 'regex_freeze'}:
        assert summary.trainable_params < summary.total_params
