"""LoRAInject next to RegexFreeze: both decide what trains, so the pair is refused at Trainer construction, in either
order and before anything changes, with the way to say it in LoRAInject alone (``modules_to_save``). That way
trains what the user meant: the adapters and the named modules, with the rest of the base bit-identical."""

from __future__ import annotations

import pytest
import torch
from support import cpu_trainer, seeded_tiny_decoder

from composer_thaw.lora_inject import LoRAInject
from composer_thaw.lora_inject.injection import adapter_layers
from composer_thaw.regex_freeze import RegexFreeze
from composer_thaw.utils.parameter_selection import user_module

LORA = dict(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'])


@pytest.mark.parametrize(
    'freeze, suggestion',
    [
        (dict(trainable=['lm_head']), "modules_to_save=['lm_head']"),
        (
            dict(trainable=['lm_head', 'model.norm.weight', r'model\.layers\.\d+\.mlp']),
            "modules_to_save=['lm_head', 'model.norm']",
        ),
        (dict(frozen=['model.embed_tokens']), "modules_to_save=['lm_head']"),
    ],
    ids=['trainable-head', 'trainable-patterns', 'frozen-only'],
)
@pytest.mark.parametrize('lora_first', [True, False], ids=['lora-first', 'regex-first'])
def test_regex_freeze_with_lora_is_refused_before_anything_changes(freeze, suggestion, lora_first):
    model = seeded_tiny_decoder(num_layers=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = [list(g['params']) for g in optimizer.param_groups]
    algorithms = [LoRAInject(**LORA), RegexFreeze(**freeze)]
    with pytest.raises(ValueError, match='LoRAInject cannot be combined with RegexFreeze') as error:
        cpu_trainer(model, algorithms if lora_first else algorithms[::-1], optimizer=optimizer, max_duration='1ba')
    assert suggestion in str(error.value)
    assert not adapter_layers(user_module(model))
    assert all(p.requires_grad and torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert [list(g['params']) for g in optimizer.param_groups] == groups and not optimizer.state


def test_the_suggested_modules_to_save_trains_adapters_and_head_and_keeps_the_base():
    model = seeded_tiny_decoder(num_layers=2)
    hf = user_module(model)
    trainer = cpu_trainer(model, [LoRAInject(**LORA, modules_to_save=['lm_head'])], max_duration='3ba')
    start = {n: p.detach().clone() for n, p in hf.named_parameters()}
    trainer.fit()
    trains = {n for n, p in hf.named_parameters() if p.requires_grad}
    assert trains == {f'{name}.{leaf}' for name in adapter_layers(hf) for leaf in ('lora_A', 'lora_B')} | {
        'lm_head.weight'
    }
    for name, param in hf.named_parameters():
        assert torch.equal(param, start[name]) == (name not in trains), name


def _two_group_adamw(model):
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{'params': decay}, {'params': rest, 'weight_decay': 0.0}], lr=3e-3, weight_decay=0.1)


def _factorize():
    from composer.algorithms import Factorize

    return Factorize(factorize_convs=False, min_features=16, latent_features=8)


def test_surgery_after_lora_at_init_finds_the_frozen_base_in_the_optimizer_and_it_stays_frozen():
    # LoRA takes its frozen parameters out of the optimizer at BEFORE_LOAD, after all INIT-time surgery: Factorize
    # (after LoRA in the list) replaces frozen linear layers, base layers included, and its new factors are frozen.
    model = seeded_tiny_decoder(num_layers=2)
    hf = user_module(model)
    optimizer = _two_group_adamw(model)
    trainer = cpu_trainer(model, [LoRAInject(**LORA), _factorize()], optimizer=optimizer, max_duration='3ba')
    layers = adapter_layers(hf)
    assert type(layers['model.layers.0.self_attn.q_proj'].base_layer).__name__ == 'FactorizedLinear'
    adapters = {f'{name}.{leaf}' for name in layers for leaf in ('lora_A', 'lora_B')}
    assert {n for n, p in hf.named_parameters() if p.requires_grad} == adapters
    assert {id(p) for g in optimizer.param_groups for p in g['params']} == {
        id(p) for n, p in hf.named_parameters() if n in adapters
    }
    start = {n: p.detach().clone() for n, p in hf.named_parameters()}
    trainer.fit()
    for name, param in hf.named_parameters():
        if name not in adapters:
            assert torch.equal(param, start[name]), name
    assert all(not torch.equal(p, start[n]) for n, p in hf.named_parameters() if n.endswith('lora_B'))


def test_dora_over_a_base_layer_another_algorithm_replaced_is_refused_before_training():
    model = seeded_tiny_decoder(num_layers=2)
    with pytest.raises(ValueError, match=r'replaced base layers of LoRA adapters .*use_dora=True needs their weight'):
        cpu_trainer(
            model,
            [LoRAInject(**LORA, use_dora=True), _factorize()],
            optimizer=_two_group_adamw(model),
            max_duration='1ba',
        )
