"""Optimizer surgery: adapters join their base weight's param group; the base leaves with no state left behind."""

from __future__ import annotations

import torch

from composer_thaw.lora_inject import apply_lora
from composer_thaw.lora_inject.injection import adapter_layers
from composer_thaw.models.builtin import tiny_decoder


def _model_and_grouped_optimizer():
    torch.manual_seed(0)
    model = tiny_decoder('llama', num_layers=2, hidden_size=32, num_heads=2).model
    decay = [p for n, p in model.named_parameters() if 'mlp' in n or 'self_attn.q_proj' in n]
    ids = {id(p) for p in decay}
    no_decay = [p for p in model.parameters() if id(p) not in ids]
    optimizer = torch.optim.AdamW(
        [{'params': decay, 'weight_decay': 0.1}, {'params': no_decay, 'weight_decay': 0.0}], lr=1e-3
    )
    ids = torch.randint(0, 1000, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()  # every base parameter now has Adam state
    optimizer.zero_grad()
    return model, optimizer


def test_adapters_join_the_param_group_of_the_weight_they_adapt():
    model, optimizer = _model_and_grouped_optimizer()
    apply_lora(model, optimizer, r=2, target_modules=['q_proj', 'v_proj', 'up_proj'])
    groups = [{id(p) for p in g['params']} for g in optimizer.param_groups]
    for name, layer in adapter_layers(model).items():
        expected = 0 if ('q_proj' in name or 'mlp' in name) else 1
        for param in layer.adapter_parameters().values():
            assert id(param) in groups[expected], name
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set().union(*groups) == trainable


def test_frozen_base_leaves_the_optimizer_with_no_state():
    model, optimizer = _model_and_grouped_optimizer()
    apply_lora(model, optimizer, r=2, target_modules=['q_proj'])
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g['params']}
    for param in model.parameters():
        if not param.requires_grad:
            assert id(param) not in in_optimizer
            assert param not in optimizer.state
            assert param.grad is None
    assert len(optimizer.param_groups) == 2  # groups are kept (schedulers index them), possibly empty


def test_a_step_after_surgery_changes_only_adapters():
    model, optimizer = _model_and_grouped_optimizer()
    apply_lora(model, optimizer, r=2, target_modules=['q_proj', 'embed_tokens'], use_dora=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for _ in range(2):
        ids = torch.randint(0, 1000, (2, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    named = dict(model.named_parameters())
    assert all(torch.equal(named[n], value) for n, value in frozen.items())  # weight decay never reaches the base
    assert all(named[n].grad is None for n in frozen)
    assert any(layer.lora_B.abs().sum() > 0 for layer in adapter_layers(model).values())


def test_adapters_cast_to_a_half_precision_base_stay_the_parameters_the_optimizer_holds():
    """What a sharded (FSDP2) model needs: one dtype per module; the adapters of a bf16 base become bf16 in place."""
    from composer_thaw.lora_inject.surgery import adapters_in_base_dtype

    torch.manual_seed(0)
    model = tiny_decoder('llama', num_layers=2, hidden_size=32, num_heads=2).model
    model.model.layers[0].to(torch.bfloat16)  # block 0 low precision, block 1 fp32
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    apply_lora(model, optimizer, r=2, target_modules=['q_proj', 'v_proj'], use_dora=True)
    layers = adapter_layers(model)
    before = {
        name: {k: (p, p.detach().clone()) for k, p in layer.adapter_parameters().items()}
        for name, layer in layers.items()
    }
    assert all(p.dtype == torch.float32 for params in before.values() for p, _ in params.values())  # autocast

    cast = adapters_in_base_dtype(model)

    assert cast == ['model.layers.0.self_attn.q_proj', 'model.layers.0.self_attn.v_proj']
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group['params']}
    for name, layer in layers.items():
        dtype = torch.bfloat16 if name in cast else torch.float32
        for key, param in layer.adapter_parameters().items():
            original, value = before[name][key]
            assert param is original and id(param) in in_optimizer
            assert param.dtype == dtype and torch.equal(param.detach(), value.to(dtype))
    assert adapters_in_base_dtype(model) == []  # nothing left to cast
