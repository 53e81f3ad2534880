"""Adapter layers: unchanged output at step 0, merge/unmerge exactness, per-slice fused adapters, conv layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from composer_thaw.lora_inject.layers import LoRAConv, LoRAEmbedding, LoRALinear


def _randomize(layer):
    with torch.no_grad():
        for param in layer.adapter_parameters().values():
            param.add_(torch.randn_like(param) * 0.2)


def _linear():
    return nn.Linear(12, 18)


def _conv1d_hf():
    return Conv1D(18, 12)  # nf=out, nx=in: weight stored (in, out)


def _embedding():
    return nn.Embedding(30, 12, padding_idx=0)


def _conv2d():
    return nn.Conv2d(3, 6, kernel_size=3, padding=1, stride=2)


def _conv1d():
    return nn.Conv1d(4, 5, kernel_size=3, padding=2, dilation=2)


LAYERS = {
    'linear': (_linear, LoRALinear, lambda: torch.randn(2, 5, 12)),
    'hf-conv1d': (_conv1d_hf, LoRALinear, lambda: torch.randn(2, 5, 12)),
    'embedding': (_embedding, LoRAEmbedding, lambda: torch.randint(0, 30, (2, 7))),
    'conv2d': (_conv2d, LoRAConv, lambda: torch.randn(2, 3, 9, 9)),
    'conv1d': (_conv1d, LoRAConv, lambda: torch.randn(2, 4, 11)),
}


@pytest.mark.parametrize('kind', list(LAYERS))
@pytest.mark.parametrize('init', ['kaiming', 'gaussian'])
def test_fresh_adapter_leaves_output_unchanged(kind, init):
    torch.manual_seed(0)
    make, cls, data = LAYERS[kind]
    base = make()
    x = data()
    expected = base(x)
    layer = cls(base, r=3, lora_alpha=6, init=init)
    assert torch.equal(layer(x), expected)


@pytest.mark.parametrize('kind', list(LAYERS))
@pytest.mark.parametrize('dora', [False, True])
def test_merge_gives_the_same_output_and_unmerge_restores_the_weight(kind, dora):
    torch.manual_seed(0)
    make, cls, data = LAYERS[kind]
    layer = cls(make(), r=3, lora_alpha=6, use_dora=dora)
    _randomize(layer)
    x = data()
    weight = layer.base_layer.weight.detach().clone()
    adapted = layer(x)
    assert not torch.allclose(adapted, layer.base_layer(x), atol=1e-4)
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), adapted, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base_layer(x), adapted, atol=1e-5, rtol=1e-5)  # the base alone is the model
    layer.merge()  # merging twice is merging once
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, weight, atol=1e-6, rtol=1e-6)  # float32 rounding only
    torch.testing.assert_close(layer(x), adapted, atol=1e-5, rtol=1e-5)


def test_rslora_scales_by_alpha_over_sqrt_r():
    assert LoRALinear(_linear(), r=4, lora_alpha=8, use_rslora=True).scaling == 4.0
    assert LoRALinear(_linear(), r=4, lora_alpha=8).scaling == 2.0


@pytest.mark.parametrize('make', [_linear, _conv1d_hf])
def test_sliced_adapter_changes_only_enabled_slices(make):
    torch.manual_seed(0)
    base = make()  # 18 outputs: three slices of 6
    layer = LoRALinear(base, r=2, lora_alpha=4, enabled_slices=[True, False, True])
    assert layer.lora_A.shape == (4, 12) and layer.lora_B.shape == (12, 2)
    _randomize(layer)
    x = torch.randn(3, 12)
    difference = layer(x) - base(x)
    assert torch.equal(difference[:, 6:12], torch.zeros(3, 6))
    assert difference[:, :6].abs().min() > 0 and difference[:, 12:].abs().min() > 0
    adapted = layer(x)
    layer.merge()
    torch.testing.assert_close(base(x), adapted, atol=1e-5, rtol=1e-5)


def test_sliced_adapter_equals_loralib_merged_linear():
    import loralib

    torch.manual_seed(0)
    reference = loralib.MergedLinear(12, 18, r=2, lora_alpha=4, enable_lora=[True, False, True])
    with torch.no_grad():
        reference.lora_B.normal_()
    base = nn.Linear(12, 18)
    base.load_state_dict({'weight': reference.weight, 'bias': reference.bias})
    ours = LoRALinear(base, r=2, lora_alpha=4, enabled_slices=[True, False, True])
    with torch.no_grad():  # loralib stacks A the same way; its B is (out_enabled, r) too
        ours.lora_A.copy_(reference.lora_A)
        ours.lora_B.copy_(reference.lora_B)
    x = torch.randn(3, 12)
    torch.testing.assert_close(ours(x), reference(x), atol=1e-5, rtol=1e-5)


def test_pissa_keeps_the_output_and_puts_the_principal_part_in_the_adapter():
    torch.manual_seed(0)
    base = _linear()
    x = torch.randn(4, 12)
    expected = base(x)
    original = base.weight.detach().clone()
    layer = LoRALinear(base, r=3, lora_alpha=6, init='pissa')
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(base.weight, original)  # the base now holds the residual
    top = torch.linalg.svdvals(original)[:3]
    torch.testing.assert_close(torch.linalg.svdvals(layer.delta_weight())[:3], top, atol=1e-4, rtol=1e-4)


def test_unknown_attributes_come_from_the_base_layer():
    layer = LoRAEmbedding(_embedding(), r=2, lora_alpha=2)
    assert layer.padding_idx == 0 and layer.num_embeddings == 30
    assert layer.weight is layer.base_layer.weight
