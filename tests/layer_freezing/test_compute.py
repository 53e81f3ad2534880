"""Compute is saved: after freezing a prefix of the model, autograd records nothing for it, so backward stops at
the first trainable unit."""

from __future__ import annotations

from composer_thaw.layer_freezing import freeze_layers
from composer_thaw.utils.parameter_selection import user_module


def test_backward_does_not_run_through_the_frozen_prefix(make_model):
    model = make_model(num_layers=4)
    freeze_layers(model, None, current_duration=1.0, freeze_start=0.0, freeze_level=0.6, granularity='block')
    root = user_module(model)  # embeddings + layers 0-1 frozen (3 of 5 units), layers 2-3 trainable

    records_graph: dict[str, bool] = {}
    hooks = [
        root.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: records_graph.__setitem__(
                name, output[0].requires_grad if isinstance(output, tuple) else output.requires_grad
            )
        )
        for name in ('model.embed_tokens', 'model.layers.0', 'model.layers.1', 'model.layers.2')
    ]
    ids = root.model.embed_tokens.weight.new_zeros((2, 8), dtype=int)
    loss = root(input_ids=ids, labels=ids).loss
    for hook in hooks:
        hook.remove()
    loss.backward()

    assert records_graph == {
        'model.embed_tokens': False,
        'model.layers.0': False,
        'model.layers.1': False,  # no graph through the frozen prefix: backward cannot reach it
        'model.layers.2': True,
    }
    assert all(
        p.grad is None
        for n, p in root.named_parameters()
        if n.startswith(('model.embed', 'model.layers.0.', 'model.layers.1.'))
    )
    assert all(p.grad is not None for n, p in root.named_parameters() if n.startswith('model.layers.2.'))
