"""Under DDP with 2 processes, LoRAInject keeps ranks bit-identical, the base untouched, and resumes exactly."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@pytest.mark.multiprocess
def test_two_process_ddp_ranks_stay_identical_and_resume_exactly(tmp_path: Path):
    out = tmp_path / 'result.json'
    launcher = Path(sys.executable).with_name('composer')
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1',
               PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    completed = subprocess.run(
        [str(launcher), '-n', '2', '--master_port', '29531', str(HERE / 'ddp_check.py'), str(out), str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result == {
        'world_size': 2,
        'ranks_read_different_data': True,
        'ranks_identical_after_every_batch': True,
        'base_unchanged': True,
        'frozen_params_with_grad': 0,
        'resumed_ranks_identical_after_every_batch': True,
        'resumed_equals_uninterrupted': True,
        'adapter_saved': True,
    }
