"""Weights written without LoRA (a plain model, a checkpoint of a run without LoRAInject) load into an adapted
model: they become the base weights, the adapters start at their initialisation, and the model computes what the
plain model computes. A LoRA checkpoint lacking its adapters still fails a strict load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from support import cpu_trainer, seeded_tiny_decoder
from torch import nn

from composer_thaw.lora_inject import LoRAInject, apply_lora, merge_adapters
from composer_thaw.lora_inject.injection import adapter_layers
from composer_thaw.lora_inject.layers import LoRAEmbedding
from composer_thaw.lora_inject.peft_format import merged_state_dict
from composer_thaw.utils.parameter_selection import user_module

IDS = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))


def _hf(seed: int, **kwargs):
    return user_module(seeded_tiny_decoder(seed=seed, num_layers=2, **kwargs)).eval()


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _conv_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()


def _base_name(name: str, layers) -> str:
    owner, _, leaf = name.rpartition('.')
    return f'{owner}.base_layer.{leaf}' if owner in layers else name


def _assert_adapters_at_init(layers) -> None:
    for name, layer in layers.items():
        zero = layer.lora_A if isinstance(layer, LoRAEmbedding) else layer.lora_B
        assert not zero.any(), f'{name}: the update is not zero'


@pytest.mark.parametrize(
    'arch, lora',
    [
        ('llama', dict(target_modules=['embed_tokens', 'q_proj', 'o_proj'], bias='all')),
        ('llama', dict(target_modules='all-linear', use_dora=True)),
        ('gpt2', dict(target_modules=['c_attn', 'c_fc'], enable_slices={'c_attn': [True, False, True]})),
    ],
    ids=['embedding+linear', 'dora', 'gpt2-conv1d-slices'],
)
def test_a_plain_state_dict_becomes_the_base_and_the_function_is_the_plain_models(arch, lora):
    plain = _hf(seed=1, arch=arch)
    model = _hf(seed=0, arch=arch)  # other weights: everything must come from the state dict
    apply_lora(model, r=4, lora_alpha=8, **lora)
    layers = adapter_layers(model)
    model.load_state_dict(plain.state_dict())  # strict
    params = dict(model.named_parameters())
    for name, value in plain.named_parameters():
        assert torch.equal(params[_base_name(name, layers)], value), name
    _assert_adapters_at_init(layers)
    if lora.get('use_dora'):
        for layer in layers.values():  # the magnitude is the loaded weight's channel norms
            torch.testing.assert_close(layer.lora_magnitude, layer._column_norm(layer.base_layer.weight))
    torch.testing.assert_close(_logits(model), _logits(plain), atol=1e-5, rtol=1e-5)


def test_a_plain_conv_state_dict_loads_into_conv_adapters():
    plain, model = _conv_model(seed=1), _conv_model(seed=0)
    apply_lora(model, r=2, target_modules=['0', '2'], use_dora=True)
    model.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), atol=1e-5, rtol=1e-5)
    assert torch.equal(model[0].base_layer.weight, plain[0].weight)


def test_pissa_is_computed_again_from_the_loaded_weights():
    plain = _hf(seed=1)
    model = _hf(seed=0)
    options = dict(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'], init='pissa')
    apply_lora(model, **options)
    model.load_state_dict(plain.state_dict())
    reference = copy.deepcopy(plain)  # PiSSA applied to the loaded weights directly
    apply_lora(reference, **options)
    expected = reference.state_dict()
    for key, value in model.state_dict().items():  # A, B, residual base, and the initial A, B kept for export
        torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=0, msg=key)
    torch.testing.assert_close(_logits(model), _logits(plain), atol=1e-5, rtol=1e-5)
    # the export for the original base fits the loaded weights: merged, it is the plain model again
    merged = merged_state_dict(model)
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(merged[key], value, atol=1e-5, rtol=0, msg=key)


def test_loading_a_plain_state_dict_into_a_merged_model_leaves_it_unmerged_and_exports_the_plain_weights():
    plain = _hf(seed=1)
    model = _hf(seed=0)
    apply_lora(model, r=4, target_modules=['q_proj', 'v_proj'], use_dora=True)
    merge_adapters(model)
    model.load_state_dict(plain.state_dict())
    assert not any(layer.merged for layer in adapter_layers(model).values())
    merged = merged_state_dict(model)
    assert merged.keys() == plain.state_dict().keys()
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(merged[key], value, atol=1e-6, rtol=0, msg=key)


def test_a_lora_state_dict_missing_its_adapters_still_fails_a_strict_load():
    source = _hf(seed=1)
    apply_lora(source, r=4, target_modules=['q_proj'])
    partial = {k: v for k, v in source.state_dict().items() if not k.endswith('.lora_B')}
    model = _hf(seed=0)
    apply_lora(model, r=4, target_modules=['q_proj'])
    with pytest.raises(RuntimeError, match=r'Missing key\(s\).*q_proj\.lora_B'):
        model.load_state_dict(partial)
    incompatible = model.load_state_dict(partial, strict=False)
    assert sorted(incompatible.missing_keys) == sorted(k for k in source.state_dict() if k.endswith('.lora_B'))


def test_a_plain_trainer_checkpoint_loads_weights_only_into_a_lora_trainer(tmp_path: Path):
    plain = seeded_tiny_decoder(seed=1, num_layers=2)
    cpu_trainer(plain, [], max_duration='2ba', save_folder=str(tmp_path), save_interval='2ba').fit()
    expected = _logits(user_module(plain).eval())
    model = seeded_tiny_decoder(seed=0, num_layers=2)
    trainer = cpu_trainer(
        model,
        [LoRAInject(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'])],
        max_duration='2ba',
        load_path=str(tmp_path / 'ep0-ba2-rank0.pt'),
        load_weights_only=True,
    )
    hf = user_module(model)
    layers = adapter_layers(hf)
    _assert_adapters_at_init(layers)
    torch.testing.assert_close(_logits(hf.eval()), expected, atol=1e-5, rtol=1e-5)
    loaded = {n: p.detach().clone() for n, p in hf.named_parameters()}
    trainer.fit()
    optimizer = trainer.state.optimizers[0]
    assert {id(p) for p in optimizer.state} == {id(p) for p in hf.parameters() if p.requires_grad}
    for name, param in hf.named_parameters():  # the base stays as loaded; the adapters trained
        if name.endswith('.lora_B'):
            assert not torch.equal(param, loaded[name]), name
        elif not name.endswith('.lora_A'):
            assert torch.equal(param, loaded[name]), name
