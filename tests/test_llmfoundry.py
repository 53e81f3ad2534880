"""llm-foundry end to end: each example YAML of yamls/llmfoundry/ trains a local Hugging Face causal LM (saved with
save_pretrained) on a local JSONL through llm-foundry's train entry point, on CPU, and resumes bit-identically.

All four algorithms run in one subprocess (tests/llmfoundry_runs.py), which imports llm-foundry once. Needs the
``llmfoundry`` extra (``pip install -e '.[llmfoundry]'``; ``make test`` installs it)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec('llmfoundry') is None,
    reason="llm-foundry is not installed: pip install -e '.[llmfoundry]' (make test installs it)",
)

RUNS = Path(__file__).with_name('llmfoundry_runs.py')
CLASSES = {
    'lora_inject': 'LoRAInject',
    'regex_freeze': 'RegexFreeze',
    'layer_freezing': 'LayerFreezing',
    'hift_rotation': 'HiFTRotation',
}


@pytest.fixture(scope='module')
def results(tmp_path_factory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp('llmfoundry')
    env = dict(os.environ, PYTHONWARNINGS='ignore', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1')
    done = subprocess.run([sys.executable, str(RUNS), str(out)], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads((out / 'results.json').read_text())


def _run(results: dict[str, Any], algorithm: str) -> dict[str, Any]:
    run = results[algorithm]
    assert 'error' not in run, run.get('traceback')
    return run


@pytest.mark.parametrize('algorithm', list(CLASSES))
def test_each_example_yaml_trains_and_resumes_bit_identically(results, algorithm):
    run = _run(results, algorithm)
    assert run['changed'], 'nothing trained'
    assert run['resume_different'] == []
    assert run['checkpoint_algorithms'] == [CLASSES[algorithm]]
    assert not run['unmatched_initial']  # the trained model is the saved folder's


def test_lora_checkpoints_hold_the_adapters_and_the_hf_export_is_plain(results):
    run = _run(results, 'lora_inject')
    assert run['new'] and all('.lora_' in name for name in run['new'])
    assert set(run['changed']) <= set(run['new'])  # the base stays as loaded
    assert run['checkpoint_tensors'] == sorted(f'model.{name}' for name in run['new'])  # no frozen base weights
    assert run['hf_export'] and not [k for k in run['hf_export'] if 'lora_' in k or 'base_layer' in k]


def test_regex_freeze_trains_exactly_its_patterns(results):
    run = _run(results, 'regex_freeze')
    assert run['changed'] and all(n.startswith(('model.layers.1.', 'lm_head.')) for n in run['changed'])
    assert run['optimizer_state_tensors'] == len(run['changed'])


@pytest.mark.parametrize('algorithm', ['layer_freezing', 'hift_rotation'])
def test_freezing_schedules_keep_optimizer_state_only_for_what_trains(results, algorithm):
    run = _run(results, algorithm)
    assert 0 < run['optimizer_state_tensors'] < len(run['checkpoint_tensors'])
