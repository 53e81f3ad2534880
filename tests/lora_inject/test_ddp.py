"""Under DDP with 2 processes, LoRAInject keeps ranks bit-identical, the base untouched, and resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support import launch

HERE = Path(__file__).resolve().parent


@pytest.mark.multiprocess
def test_two_process_ddp_ranks_stay_identical_and_resume_exactly(tmp_path: Path):
    out = tmp_path / 'result.json'
    launch(HERE / 'ddp_check.py', out, tmp_path)
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
