"""Tracing one forward finds the order modules run in, and leaves the model exactly as it was: same tensors, same
ties, same modes, same hooks, same random state; a forward that cannot run is reported, never a crash."""

from __future__ import annotations

import pytest
import torch
from architectures import ARCHITECTURES, VISION
from torch import nn

from composer_thaw.utils.execution_order import ForwardTraceError, example_inputs, trace_forward
from composer_thaw.utils.parameter_selection import split_into_units


def _first_use_order(model: nn.Module) -> list[str]:
    trace = trace_forward(model)
    return sorted(trace.parameter_use, key=trace.parameter_use.__getitem__)


def test_opt_final_norm_registered_before_the_layers_is_used_after_them():
    model = ARCHITECTURES['opt'].build()
    registered = list(dict(model.named_parameters()))
    assert registered.index('model.decoder.final_layer_norm.weight') < registered.index(
        'model.decoder.layers.0.fc1.weight'
    )
    order = _first_use_order(model)
    assert order[:2] == ['model.decoder.embed_tokens.weight', 'model.decoder.embed_positions.weight']
    assert order[-2:] == ['model.decoder.final_layer_norm.weight', 'model.decoder.final_layer_norm.bias']
    assert sorted(order) == sorted(registered)  # every parameter is used once the forward has run


def test_the_trace_changes_nothing_in_the_model_nor_the_random_state():
    model = ARCHITECTURES['t5'].build()
    model.encoder.eval()
    before = {name: (param, param.detach().clone()) for name, param in model.named_parameters()}
    modes = {name: module.training for name, module in model.named_modules()}
    calls = []
    model.encoder.register_forward_pre_hook(lambda module, args: calls.append('user hook'))
    torch.manual_seed(3)
    expected_draw = torch.rand(3)
    torch.manual_seed(3)

    trace_forward(model)

    assert torch.equal(torch.rand(3), expected_draw)
    assert calls == []  # hooks (FSDP2's all-gathers among them) do not run during the trace ...
    model.encoder(input_ids=torch.tensor([[1, 2]]))
    assert calls == ['user hook']  # ... and are back afterwards
    assert model.lm_head.weight is model.shared.weight and model.encoder.embed_tokens is model.shared
    after = dict(model.named_parameters())
    assert list(after) == list(before)
    for name, (param, value) in before.items():
        assert after[name] is param and torch.equal(param, value), name
    assert {name: module.training for name, module in model.named_modules()} == modes


def test_a_model_on_the_meta_device_traces_like_a_materialized_one():
    arch = ARCHITECTURES['opt']
    with torch.device('meta'):
        meta_model = arch.make()
    assert next(meta_model.parameters()).is_meta
    assert [u.name for u in split_into_units(meta_model)] == [u.name for u in split_into_units(arch.build())]


def test_a_hook_that_would_fail_does_not_run_during_the_trace():
    model = ARCHITECTURES['llama'].build()

    def collective(module, args):
        raise RuntimeError('an all-gather outside of a process group')

    model.model.layers[0].register_forward_pre_hook(collective)
    assert _first_use_order(model)[-1] == 'lm_head.weight'


class _NeedsTwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(4)  # registered first, runs last
        self.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.embed = nn.Linear(4, 4)

    def forward(self, x, y):
        x = self.embed(x + y)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def test_a_forward_that_cannot_run_is_reported_and_units_fall_back_to_registration_order():
    model = _NeedsTwoInputs()
    with pytest.raises(ForwardTraceError, match=r'TypeError: .*missing 1 required positional argument'):
        trace_forward(model)
    with pytest.warns(UserWarning, match='Could not trace a forward of _NeedsTwoInputs.*registered in'):
        units = split_into_units(model)
    assert [u.name for u in units] == ['norm', 'blocks.0', 'blocks.1', 'embed']

    explicit = trace_forward(model, ((torch.zeros(1, 4), torch.zeros(1, 4)), {}))
    assert sorted(explicit.parameter_use, key=explicit.parameter_use.__getitem__)[:2] == ['embed.weight', 'embed.bias']


def test_no_input_can_be_guessed_for_a_model_without_a_first_layer_to_read():
    with pytest.raises(ForwardTraceError, match='cannot guess an input for LayerNorm'):
        example_inputs(nn.LayerNorm(3))
    with pytest.warns(UserWarning, match='cannot guess an input for Sequential'):
        units = split_into_units(nn.Sequential(nn.LayerNorm(3), nn.LayerNorm(3)))
    assert [u.name for u in units] == ['0', '1']


@pytest.mark.parametrize('name', ['resnet18', 'vit'])
def test_vision_models_get_an_image_of_their_size(name):
    (image,), _ = example_inputs(VISION[name].build())[0]
    assert image.shape == ((1, 3, 16, 16) if name == 'vit' else (1, 3, 32, 32))
