"""Exports from a sharded model: the adapter and the merged model written by LoRAInject under FSDP2 at world size 2
have the files, keys and (within FSDP2's rounding) values of the same run in one unsharded process, and load in
Hugging Face."""

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from algorithms.lora_inject import LoRAInject
from conformance.harness import SHARDED_LR, adamw, make_trainer, tiny_model
from support import launch

HERE = Path(__file__).parent
# Adam's first step moves an element by +-lr whatever its gradient's size, so a near-zero gradient element whose
# sign differs between the reduce-scatter and one process' sum ends up to 2 * lr apart (see test_sharded.py).
MAX_DIFF = 2 * SHARDED_LR + 1e-6
MEAN_DIFF = 1e-5


def train_and_export(out: Path, **trainer_options: Any) -> None:
    """2 epochs of LoRA (with a head trained in full) on the conformance task, exporting both formats at the end."""
    lora = LoRAInject(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'], modules_to_save=['lm_head'],
                      save_adapter_to=str(out / 'adapter'), save_merged_to=str(out / 'merged'))
    model = tiny_model()
    trainer = make_trainer([lora], max_duration='2ep', model=model, optimizers=adamw(model, SHARDED_LR),
                           eval_dataloader=None, **trainer_options)
    trainer.fit()
    trainer.close()


def _assert_close_tensors(sharded: dict[str, torch.Tensor], single: dict[str, torch.Tensor]) -> None:
    assert sharded.keys() == single.keys()
    differences = torch.cat([(sharded[key] - value).abs().flatten() for key, value in single.items()])
    assert differences.max() <= MAX_DIFF and differences.mean() <= MEAN_DIFF


@pytest.mark.multiprocess
def test_sharded_adapter_and_merged_exports_equal_the_unsharded_ones(tmp_path):
    train_and_export(tmp_path / 'single')
    launch(HERE / 'sharded_export_script.py', tmp_path / 'sharded')

    for folder in ('adapter', 'merged'):
        files = sorted(p.name for p in (tmp_path / 'single' / folder).iterdir())
        assert sorted(p.name for p in (tmp_path / 'sharded' / folder).iterdir()) == files
    config = 'adapter/adapter_config.json'
    sharded_config, single_config = (json.loads((tmp_path / run / config).read_text()) for run in ('sharded', 'single'))
    assert sharded_config == single_config
    for weights in ('adapter/adapter_model.safetensors', 'merged/model.safetensors'):
        _assert_close_tensors(load_file(tmp_path / 'sharded' / weights), load_file(tmp_path / 'single' / weights))

    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / 'sharded' / 'merged')
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in tiny_model().model.parameters())
