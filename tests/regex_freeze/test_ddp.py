"""Under DDP with 2 processes, RegexFreeze keeps ranks bit-identical and frozen rows exact, and resumes exactly."""

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
def test_two_process_ddp(tmp_path: Path):
    out = tmp_path / 'result.json'
    launcher = Path(sys.executable).with_name('composer')
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1', TRANSFORMERS_OFFLINE='1',
               PYTHONPATH=f'{REPO}{os.pathsep}{os.environ.get("PYTHONPATH", "")}')
    completed = subprocess.run(
        [str(launcher), '-n', '2', '--master_port', '29533', str(HERE / 'ddp_check.py'), str(out),
         str(tmp_path / 'checkpoints')],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result == {
        'world_size': 2,
        'ranks_read_different_data': True,
        'ranks_identical_after_every_batch': True,
        'frozen_elements_exact_on_every_rank': True,
        'trainable_rows_moved': True,
        'optimizer_state_only_for_trainable': True,
        'resumed_ranks_identical_after_every_batch': True,
        'resumed_equals_uninterrupted': True,
    }
