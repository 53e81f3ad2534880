"""Under DDP with 2 processes, ranks train the same group, stay bit-identical and resume exactly; freezing the
inactive groups before DDP wraps the model (the pitfall HiFTRotation avoids) lets ranks drift."""

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
        [str(launcher), '-n', '2', '--master_port', '29533', str(HERE / 'ddp_check.py'), str(out),
         str(tmp_path / 'checkpoints')],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]

    result = json.loads(out.read_text())
    assert result['world_size'] == 2
    assert result['ranks_read_different_data']  # so identical ranks mean gradients really were all-reduced
    assert result['batches'] == 12
    assert result['same_group_on_every_rank']
    assert result['ranks_identical_after_every_batch']
    assert result['inactive_params_with_grad'] == 0
    assert result['resumed_ranks_identical_after_every_batch']
    assert result['resumed_equals_uninterrupted']
    assert not all(result['frozen_at_wrap_ranks_identical_per_batch'])  # the pitfall is real
