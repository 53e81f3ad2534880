"""HiFT with fp32 masters (issue #22): a group's master waits with its optimizer state between visits, so the rotation
equals, bit for bit, a plain loop that keeps an fp32 master of every trainable tensor for the whole run."""

from __future__ import annotations

import copy

import pytest
import torch
from support import seeded_tiny_decoder
from torch import nn

from composer_thaw.hift_rotation import GroupQueue, GroupRotation, plan_rotation
from composer_thaw.lora_inject import apply_lora
from composer_thaw.lora_inject.surgery import adapters_in_base_dtype
from composer_thaw.utils.master_weights import master_weights_of
from composer_thaw.utils.parameter_selection import named_parameters

BF16 = torch.bfloat16
LR, WEIGHT_DECAY = 1e-5, 0.1
STEPS = 14  # five units: every group is visited at least twice


def bf16_decoder() -> nn.Module:
    return seeded_tiny_decoder(num_layers=2).model.to(BF16)


def adamw(params: dict[str, torch.Tensor]) -> torch.optim.AdamW:
    """Two param groups (weight decay on matrices only), as a fine-tuning recipe has."""
    decay = [p for p in params.values() if p.ndim >= 2]
    no_decay = [p for p in params.values() if p.ndim < 2]
    return torch.optim.AdamW(
        [{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}], lr=LR, weight_decay=WEIGHT_DECAY
    )


def tokens(step: int) -> torch.Tensor:
    return torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(step))


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in named_parameters(model).items() if p.requires_grad}


def active_names_per_step(model, optimizer, group_size, strategy, steps_per_group, lora=False) -> list[set[str]]:
    """The parameter names HiFT trains at each step: its units (tested against the hift package elsewhere) visited in
    its queue's order, one group per ``steps_per_group`` steps."""
    plan = plan_rotation(model, optimizer, group_size, None, None, None)
    queue = GroupQueue(plan.rotating, group_size, strategy, seed=0)
    per_step: list[set[str]] = []
    for step in range(STEPS):
        if step % steps_per_group == 0:
            group = queue.next_group()[0]
        per_step.append({name for i in (*group, *plan.always) for name in plan.units[i].parameter_names})
    return per_step


def reference_run(model: nn.Module, active_per_step: list[set[str]]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The promise, written as plainly as possible: an fp32 master of every trainable tensor for the whole run, AdamW
    over the masters, only the active group's gradients given to it, each active master cast back into its weight."""
    params = trainable(model)
    masters = {name: p.detach().float().clone() for name, p in params.items()}
    optimizer = adamw(masters)
    for step, active in enumerate(active_per_step):
        model.zero_grad(set_to_none=True)
        model(input_ids=tokens(step), labels=tokens(step)).loss.backward()
        for name, master in masters.items():
            grad = params[name].grad
            master.grad = grad.float() if name in active and grad is not None else None
        optimizer.step()
        with torch.no_grad():
            for name in active:
                params[name].copy_(masters[name])
    return model, masters


def rotation_run(model: nn.Module, **options) -> GroupRotation:
    optimizer = adamw(trainable(model))
    rotation = GroupRotation(model, optimizer, **options)
    for step in range(STEPS):
        rotation.before_step()
        model(input_ids=tokens(step), labels=tokens(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return rotation


def assert_equal_to_reference(model, rotation, reference_model, reference_masters) -> None:
    expected = named_parameters(reference_model)
    for name, param in named_parameters(model).items():
        assert torch.equal(param.detach(), expected[name].detach()), f'weight {name} differs from the reference'
    masters = master_weights_of(rotation.optimizer)
    assert masters is not None
    params = named_parameters(model)
    for name, reference in reference_masters.items():
        master = masters.master_of(params[name])
        if params[name].dtype == torch.float32:  # its own master
            continue
        assert master is not None, f'{name} lost its master'
        assert torch.equal(master, reference), f'master of {name} differs from the reference'


CONFIGS = [
    pytest.param({'strategy': 'down2up'}, id='down2up'),
    pytest.param({'strategy': 'up2down'}, id='up2down'),
    pytest.param({'strategy': 'random'}, id='random'),
    pytest.param({'strategy': 'down2up', 'steps_per_group': 2}, id='steps_per_group-2'),
    pytest.param({'strategy': 'random', 'group_size': 2}, id='group_size-2'),
    pytest.param({'strategy': 'up2down', 'offload': False}, id='no-offload'),
]


@pytest.mark.parametrize('options', CONFIGS)
def test_rotation_with_masters_equals_a_loop_that_keeps_every_master(options):
    options = {'group_size': 1, 'steps_per_group': 1, **options}
    model = bf16_decoder()
    reference = copy.deepcopy(model)
    rotation = rotation_run(model, master_weights='fp32', **options)
    plan_options = {k: options[k] for k in ('group_size', 'strategy', 'steps_per_group')}
    per_step = active_names_per_step(reference, adamw(trainable(reference)), **plan_options)
    assert_equal_to_reference(model, rotation, *reference_run(reference, per_step))


def test_masters_keep_what_pure_bf16_rounds_away():
    with_masters, pure = bf16_decoder(), bf16_decoder()
    rotation_run(with_masters, master_weights='fp32')
    rotation_run(pure)
    start = named_parameters(bf16_decoder())
    moved = {
        label: sum(int((p.detach() != start[n]).sum()) for n, p in named_parameters(model).items())
        for label, model in (('masters', with_masters), ('pure', pure))
    }
    assert moved['masters'] > moved['pure'], f'the masters changed nothing: {moved}'


@pytest.mark.parametrize('offload', [True, False])
def test_an_inactive_groups_masters_wait_with_its_optimizer_state(offload):
    model = bf16_decoder()
    optimizer = adamw(trainable(model))
    rotation = GroupRotation(model, optimizer, master_weights='fp32', offload=offload)
    masters = master_weights_of(optimizer)
    assert masters is not None
    for step in range(7):
        rotation.before_step()
        model(input_ids=tokens(step), labels=tokens(step)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    active = {id(p) for p in rotation.active_params}
    assert set(masters.masters) == active
    inactive = [p for p in rotation.managed_params if id(p) not in active]
    assert {id(p) for p in inactive} == set(masters.parked), 'every visited group keeps its masters'
    for param in inactive:
        master = masters.master_of(param)
        assert master is not None and master.dtype == torch.float32
        assert torch.equal(master.to(BF16), param.detach()), 'a parked master is not its weight, cast'
    inactive_bytes = 4 * sum(p.numel() for p in inactive)
    active_bytes = 4 * sum(p.numel() for p in rotation.active_params)
    if offload:  # with the offloaded optimizer state
        assert masters.offloaded_bytes() == inactive_bytes and masters.master_bytes() == active_bytes
        assert all(parked.offloaded for parked in masters.parked.values())
    else:  # kept where the weights are
        assert masters.offloaded_bytes() == 0 and masters.master_bytes() == active_bytes + inactive_bytes
    assert rotation.metrics()['offloaded_master_bytes'] == masters.offloaded_bytes()


def test_lora_rotation_over_bf16_adapters_equals_the_reference():
    # bf16 adapters (as LoRAInject makes them under FSDP2) rotate with their masters, one layer's adapters at a time.
    model = bf16_decoder()
    lora = {'r': 4, 'lora_alpha': 8, 'target_modules': ['q_proj', 'v_proj'], 'init': 'gaussian'}
    apply_lora(model, torch.optim.SGD(model.parameters(), lr=0.0), **lora)
    adapters_in_base_dtype(model)
    assert all(p.dtype == BF16 for p in trainable(model).values())
    reference = copy.deepcopy(model)
    rotation = rotation_run(model, lora=True, master_weights='fp32')
    per_step = active_names_per_step(reference, adamw(trainable(reference)), 1, 'down2up', 1)
    assert_equal_to_reference(model, rotation, *reference_run(reference, per_step))
