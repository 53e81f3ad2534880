"""Whole-model use: the EXAMPLES run in a Trainer, merged inference, quantized (QLoRA-style) bases."""

from __future__ import annotations

import pytest
import torch
from support import cpu_trainer, seeded_tiny_decoder

from composer_thaw.lora_inject import LoRAInject, apply_lora, merge_adapters, unmerge_adapters
from composer_thaw.lora_inject.injection import adapter_layers
from composer_thaw.lora_inject.lora_inject import EXAMPLES
from composer_thaw.utils.parameter_selection import user_module


@pytest.mark.parametrize('example', EXAMPLES, ids=lambda e: ','.join(sorted(e)))
def test_examples_train_on_the_tiny_llama_decoder(example):
    model = seeded_tiny_decoder(num_layers=4)
    trainer = cpu_trainer(model, [LoRAInject(**example)], max_duration='2ba')
    trainer.fit()
    assert adapter_layers(user_module(model))
    assert all(p.requires_grad == (p in trainer.state.optimizers[0].state) for p in model.parameters())


def test_merged_inference_gives_the_adapted_outputs_and_unmerge_restores():
    model = user_module(seeded_tiny_decoder(num_layers=2)).eval()
    apply_lora(model, r=4, target_modules='all-linear', use_dora=True)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(std=0.1)
    ids = torch.randint(0, 1000, (2, 10))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        merge_adapters(model)
        merged = model(input_ids=ids).logits
        unmerge_adapters(model)
        unmerged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(unmerged, adapted, atol=1e-5, rtol=1e-4)


def test_several_optimizers_are_refused_before_any_change():
    model = user_module(seeded_tiny_decoder(num_layers=2))
    optimizers = [torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(model.parameters(), lr=0.1)]
    with pytest.raises(NotImplementedError, match='Only one optimizer'):
        apply_lora(model, optimizers, r=2, target_modules=['q_proj'])
    assert not adapter_layers(model)


def _bitsandbytes_on_gpu() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _bitsandbytes_on_gpu(), reason='needs bitsandbytes and a CUDA GPU')
def test_a_4bit_quantized_base_trains_its_adapters():
    import bitsandbytes as bnb

    model = user_module(seeded_tiny_decoder(num_layers=2))
    for layer in model.model.layers:
        linear = layer.self_attn.q_proj
        quantized = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=False, compute_dtype=torch.float32, quant_type='nf4'
        )
        quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type='nf4')
        layer.self_attn.q_proj = quantized
    model.cuda()
    with pytest.raises(ValueError, match='quantized'):
        apply_lora(model, r=2, target_modules=['q_proj'], use_dora=True)
    apply_lora(model, r=2, target_modules=['q_proj'])
    ids = torch.randint(0, 1000, (2, 8), device='cuda')
    model(input_ids=ids, labels=ids).loss.backward()
    for layer in adapter_layers(model).values():
        assert layer.lora_A.dtype == torch.float32 and layer.lora_B.grad is not None
        assert layer.lora_B.grad.abs().sum() > 0
    with pytest.raises(NotImplementedError, match='quantized'):
        merge_adapters(model)
