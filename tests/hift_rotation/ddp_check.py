"""Run under ``composer -n 2``: HiFTRotation under DDP keeps ranks bit-identical and resumes exactly.

One launch checks, on 2 CPU processes (gloo), each rank reading different data, with the ``random`` strategy:
* both ranks train the same group at every step (the order is seeded by the rank-zero seed);
* after every batch all parameters are bit-identical on both ranks (each group is all-reduced once active);
* inactive parameters never hold a gradient after backward;
* a run resumed at world size 2 mid-pass ends bit-identical to the uninterrupted one;
* the pitfall: if the inactive groups are already frozen when DDP wraps the model, ranks drift apart.
Rank 0 writes the findings as JSON to the path given as the first argument.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import torch
from composer.utils import dist
from rank_checks import RankChecks, rank_trainer, resumed_equals_uninterrupted, write_from_rank_zero

from composer_thaw.hift_rotation import GroupRotation, HiFTRotation
from composer_thaw.models.builtin import tiny_decoder
from composer_thaw.utils.parameter_selection import user_module


class Checks(RankChecks):
    """RankChecks plus whether every rank trains the same group at each step."""

    def __init__(self):
        super().__init__()
        self.same_group = []

    def batch_start(self, state, logger):
        trainable = [n for n, p in user_module(state.model).named_parameters() if p.requires_grad]
        self.same_group.append(len({tuple(t) for t in dist.all_gather_object(trainable)}) == 1)


def train(save_folder, load_path, seed, duration='2ep'):
    torch.manual_seed(seed)
    model = tiny_decoder('llama', num_layers=3, hidden_size=32, num_heads=4)
    checks = Checks()
    algorithms = [HiFTRotation(group_size=2, strategy='random')]
    # 24 blocks: 6 batches per rank and epoch
    trainer = rank_trainer(model, algorithms, checks, blocks=24, save_folder=save_folder, load_path=load_path,
                           max_duration=duration)  # fmt: skip
    trainer.fit()
    return model, checks


def main(out_path: str, folder: str) -> None:
    uninterrupted, checks = train(folder, None, seed=0)
    dist.barrier()
    resumed, resumed_checks = train(folder, os.path.join(folder, 'ep0-ba4-rank0.pt'), seed=1)

    # the pitfall: keep the inactive groups frozen while DDP wraps the model
    require_grad_everywhere = GroupRotation.require_grad_everywhere
    GroupRotation.require_grad_everywhere = lambda self: None
    try:
        _, pitfall = train(None, None, seed=0, duration='8ba')
    finally:
        GroupRotation.require_grad_everywhere = require_grad_everywhere

    result = {
        'world_size': dist.get_world_size(),
        'ranks_read_different_data': checks.ranks_read_different_data(),
        'batches': len(checks.ranks_identical),
        'same_group_on_every_rank': all(checks.same_group + resumed_checks.same_group),
        'ranks_identical_after_every_batch': all(checks.ranks_identical),
        'inactive_params_with_grad': checks.frozen_grads + resumed_checks.frozen_grads,
        'resumed_ranks_identical_after_every_batch': all(resumed_checks.ranks_identical),
        'resumed_equals_uninterrupted': resumed_equals_uninterrupted(uninterrupted, resumed),
        'frozen_at_wrap_ranks_identical_per_batch': pitfall.ranks_identical,
    }
    write_from_rank_zero(out_path, result)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
