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

import json
import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import torch
from composer import Trainer
from composer.utils import dist
from rank_checks import RankChecks

from composer_thaw.data import LanguageModelingDataset, build_dataloader, python_topics_corpus
from composer_thaw.hift_rotation import GroupRotation, HiFTRotation
from composer_thaw.models import load_tokenizer, tiny_decoder
from composer_thaw.parameter_selection import user_module
from composer_thaw.training import parameter_checksum


class Checks(RankChecks):
    """RankChecks plus whether every rank trains the same group at each step."""

    def __init__(self):
        super().__init__()
        self.same_group = []

    def batch_start(self, state, logger):
        trainable = [n for n, p in user_module(state.model).named_parameters() if p.requires_grad]
        self.same_group.append(len({tuple(t) for t in dist.all_gather_object(trainable)}) == 1)


def train(save_folder, load_path, seed, duration='2ep'):
    tokenizer = load_tokenizer()
    dataset = LanguageModelingDataset(python_topics_corpus()[0], tokenizer, max_seq_len=32, max_blocks=24)
    loader = build_dataloader(dataset, tokenizer, batch_size=2, shuffle=True, drop_last=True)  # 6 batches per rank
    torch.manual_seed(seed)
    model = tiny_decoder('llama', num_layers=3, hidden_size=32, num_heads=4)
    checks = Checks()
    Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=duration,
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
        algorithms=[HiFTRotation(group_size=2, strategy='random')],
        callbacks=[checks],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
        seed=17,
        save_folder=save_folder if load_path is None else None,
        save_interval='4ba',
        load_path=load_path,
    ).fit()
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

    batch_digests = dist.all_gather_object(checks.first_batch_digest)
    final = dist.all_gather_object(parameter_checksum(uninterrupted))
    final_resumed = dist.all_gather_object(parameter_checksum(resumed))
    result = {
        'world_size': dist.get_world_size(),
        'ranks_read_different_data': len(set(batch_digests)) == dist.get_world_size(),
        'batches': len(checks.ranks_identical),
        'same_group_on_every_rank': all(checks.same_group + resumed_checks.same_group),
        'ranks_identical_after_every_batch': all(checks.ranks_identical),
        'inactive_params_with_grad': checks.frozen_grads + resumed_checks.frozen_grads,
        'resumed_ranks_identical_after_every_batch': all(resumed_checks.ranks_identical),
        'resumed_equals_uninterrupted': final == final_resumed and len(set(final)) == 1,
        'frozen_at_wrap_ranks_identical_per_batch': pitfall.ranks_identical,
    }
    if dist.get_global_rank() == 0:
        with open(out_path, 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
