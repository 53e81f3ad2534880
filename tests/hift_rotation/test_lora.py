"""With ``lora=True`` the rotation runs over the adapters ``LoRAInject`` injected (HiFT's lora_tuning mode): the
base stays bit-identical, one unit's adapters train per step, in either order in the algorithm list."""

from __future__ import annotations

import pytest
import torch
from support import cpu_trainer, seeded_tiny_decoder

from composer_thaw.hift_rotation import HiFTRotation
from composer_thaw.lora_inject import LoRAInject
from composer_thaw.utils.parameter_selection import user_module

from .helpers import StepWatcher


@pytest.mark.parametrize('hift_first', [True, False])
def test_rotation_over_lora_adapters_keeps_the_base_and_trains_one_block_per_step(hift_first):
    model = seeded_tiny_decoder()
    initial = {n: p.detach().clone() for n, p in user_module(model).named_parameters()}
    lora = LoRAInject(r=2, lora_alpha=4, target_modules=['q_proj', 'v_proj'])
    hift = HiFTRotation(lora=True, group_size=1)
    watcher = StepWatcher()
    cpu_trainer(model, [hift, lora] if hift_first else [lora, hift], max_duration='8ba', callbacks=[watcher]).fit()

    assert [u.name for u in hift.rotation.plan.units] == [f'model.layers.{i}' for i in range(4)]
    for name, param in user_module(model).named_parameters():
        if 'lora_' not in name:
            assert torch.equal(param, initial[name.replace('.base_layer', '')]), name
    for step, trainable in enumerate(watcher.trainable):
        block = f'model.layers.{step % 4}.'
        assert trainable and all(n.startswith(block) and 'lora_' in n for n in trainable)
        assert set(watcher.changed[step]) <= set(trainable)
    assert any('lora_B' in n for n in watcher.changed[-1])  # B moves away from zero: adapters really train


def test_lora_true_without_adapters_and_adapters_without_lora_true_are_refused():
    with pytest.raises(ValueError, match='lora=True rotates over LoRA adapters, but the model has none'):
        cpu_trainer(seeded_tiny_decoder(), [HiFTRotation(lora=True)])
    with pytest.raises(ValueError, match='set lora=True'):
        cpu_trainer(seeded_tiny_decoder(), [LoRAInject(r=2, target_modules=['q_proj']), HiFTRotation()])
