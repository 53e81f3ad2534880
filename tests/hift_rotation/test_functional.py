"""apply_hift_rotation trains one group per step in a plain torch loop, without a Trainer."""

import torch
from support import lm_loader, seeded_tiny_decoder

from composer_thaw import apply_hift_rotation
from composer_thaw.utils.parameter_selection import user_module


def test_plain_loop_trains_one_group_per_step_bottom_up():
    model = seeded_tiny_decoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    rotation = apply_hift_rotation(model, optimizer, group_size=1, strategy='down2up')
    names = dict(user_module(model).named_parameters())
    changed_per_step = []
    for _, batch in zip(range(3), lm_loader()):
        rotation.before_step()
        before = {n: p.detach().clone() for n, p in names.items()}
        model.loss(model(batch), batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        changed_per_step.append({n for n, p in names.items() if not torch.equal(p, before[n])})
    assert changed_per_step[0] == {'model.embed_tokens.weight'}
    assert changed_per_step[1] and all(n.startswith('model.layers.0.') for n in changed_per_step[1])
    assert changed_per_step[2] and all(n.startswith('model.layers.1.') for n in changed_per_step[2])
