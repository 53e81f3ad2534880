"""LoRAInject next to RegexFreeze: both decide what trains, so the pair is refused at Trainer construction, in either
order and before anything changes, with the way to say it in LoRAInject alone (``modules_to_save``). That way
trains what the user meant: the adapters and the named modules, with the rest of the base bit-identical."""

from __future__ import annotations

import pytest
import torch
from support import cpu_trainer, seeded_tiny_decoder

from algorithms.lora_inject import LoRAInject
from algorithms.lora_inject.injection import adapter_layers
from algorithms.parameter_selection import user_module
from algorithms.regex_freeze import RegexFreeze

LORA = dict(r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj'])


@pytest.mark.parametrize('freeze, suggestion', [
    (dict(trainable=['lm_head']), "modules_to_save=['lm_head']"),
    (dict(trainable=['lm_head', 'model.norm.weight', r'model\.layers\.\d+\.mlp']),
     "modules_to_save=['lm_head', 'model.norm']"),
    (dict(frozen=['model.embed_tokens']), "modules_to_save=['lm_head']"),
], ids=['trainable-head', 'trainable-patterns', 'frozen-only'])
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
        'lm_head.weight'}
    for name, param in hf.named_parameters():
        assert torch.equal(param, start[name]) == (name not in trains), name
