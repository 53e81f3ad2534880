"""Run under ``composer -n 2``: LayerFreezing under DDP keeps ranks bit-identical and resumes exactly.

One launch checks, on 2 CPU processes (gloo), with each rank reading different data:
* after every batch (freezing happens mid-run, every 2 batches), all parameters are bit-identical on both ranks;
* frozen parameters never hold a gradient after backward;
* a run resumed at world size 2 from a checkpoint saved after freezing began ends bit-identical to the
  uninterrupted run.
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

from composer_thaw.layer_freezing import LayerFreezing
from composer_thaw.models.builtin import tiny_decoder
from composer_thaw.utils.parameter_selection import user_module


class Checks(RankChecks):
    """RankChecks plus how many parameters are frozen after each batch."""

    def __init__(self):
        super().__init__()
        self.frozen_counts = []

    def batch_end(self, state, logger):
        super().batch_end(state, logger)
        self.frozen_counts.append(sum(1 for p in user_module(state.model).parameters() if not p.requires_grad))


def train(save_folder: str, load_path: str | None, seed: int) -> tuple[torch.nn.Module, Checks]:
    torch.manual_seed(seed)
    model = tiny_decoder('llama', num_layers=3, hidden_size=32, num_heads=4)
    checks = Checks()
    algorithms = [LayerFreezing(freeze_start=0.0, freeze_level=0.75, granularity='block', interval=2)]
    # 16 blocks: 4 batches per rank and epoch
    rank_trainer(model, algorithms, checks, blocks=16, save_folder=save_folder, load_path=load_path).fit()
    return model, checks


def main(out_path: str, folder: str) -> None:
    uninterrupted, checks = train(folder, None, seed=0)
    dist.barrier()
    resumed, resumed_checks = train(folder, os.path.join(folder, 'ep0-ba4-rank0.pt'), seed=1)

    result = {
        'world_size': dist.get_world_size(),
        'ranks_read_different_data': checks.ranks_read_different_data(),
        'ranks_identical_after_every_batch': all(checks.ranks_identical) and len(checks.ranks_identical) == 8,
        'frozen_params_per_batch': checks.frozen_counts,
        'frozen_params_with_grad': checks.frozen_grads + resumed_checks.frozen_grads,
        'resumed_ranks_identical_after_every_batch': all(resumed_checks.ranks_identical),
        'resumed_equals_uninterrupted': resumed_equals_uninterrupted(uninterrupted, resumed),
    }
    write_from_rank_zero(out_path, result)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
