"""Run under ``composer -n 2`` (a part of tests/two_processes.py): ``master_weights='fp32'`` under DDP.

A bf16 decoder trained by HiFTRotation (``random`` strategy, group_size 2) with fp32 masters, each rank reading
different data: after every batch the bf16 weights are bit-identical on both ranks and every master, cast, equals its
weight, and the weights equal an fp32 reference that keeps every master for the whole run (conformance's
``MasterReference``: with 3 groups, 8 steps visit each group more than once); at the end the masters (parked ones
included) are identical on both ranks; a run resumed at world size 2 mid-run ends bit-identical
to the uninterrupted one. Rank 0 writes the findings as JSON to the path given as the first argument.
"""

from __future__ import annotations

import hashlib
import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import torch
from composer import Trainer
from composer.utils import dist
from conformance.harness import MasterReference
from rank_checks import RankChecks, rank_trainer, resumed_equals_uninterrupted, write_from_rank_zero

from composer_thaw.hift_rotation import HiFTRotation
from composer_thaw.models.builtin import tiny_decoder
from composer_thaw.utils.master_weights import master_weights_of


class Checks(RankChecks):
    """RankChecks plus: every master, cast to bf16, is its weight after each batch."""

    def __init__(self):
        super().__init__()
        self.masters_are_weights: list[bool] = []
        self.master_bytes: list[int] = []

    def batch_end(self, state, logger):
        super().batch_end(state, logger)
        masters = master_weights_of(state.optimizers[0])
        assert masters is not None
        self.master_bytes.append(masters.master_bytes())
        self.masters_are_weights.append(
            all(torch.equal(m.to(torch.bfloat16), p.detach()) for p, m in masters.masters.values())
        )


def _master_digest(trainer: Trainer) -> str:
    masters = master_weights_of(trainer.state.optimizers[0])
    assert masters is not None
    digest = hashlib.sha256()
    for name, master in sorted(masters.state_dict().items()):
        digest.update(name.encode())
        digest.update(master.numpy().tobytes())
    return digest.hexdigest()


def train(save_folder, load_path, seed):
    torch.manual_seed(seed)
    model = tiny_decoder('llama', num_layers=3, hidden_size=32, num_heads=4).to(torch.bfloat16)
    checks, reference = Checks(), MasterReference()
    algorithms = [HiFTRotation(group_size=2, strategy='random', master_weights='fp32')]
    # 24 blocks: 6 batches per rank and epoch
    trainer = rank_trainer(model, algorithms, checks, reference, blocks=24, save_folder=save_folder,
                           load_path=load_path, max_duration='8ba')  # fmt: skip
    trainer.fit()
    return trainer, checks, reference


def main(out_path: str, folder: str) -> None:
    uninterrupted, checks, reference = train(folder, None, seed=0)
    dist.barrier()
    resumed, resumed_checks, _ = train(folder, os.path.join(folder, 'ep0-ba4-rank0.pt'), seed=1)
    masters = dist.all_gather_object(_master_digest(uninterrupted))
    masters_resumed = dist.all_gather_object(_master_digest(resumed))
    result = {
        'world_size': dist.get_world_size(),
        'ranks_read_different_data': checks.ranks_read_different_data(),
        'batches': len(checks.ranks_identical),
        'ranks_identical_after_every_batch': all(checks.ranks_identical + resumed_checks.ranks_identical),
        'masters_are_weights_after_every_batch': all(checks.masters_are_weights + resumed_checks.masters_are_weights),
        'masters_held': min(checks.master_bytes) > 0,
        'reference_steps': reference.steps,
        'reference_failures': dist.all_gather_object(reference.failures),
        'weights_bf16': all(p.dtype == torch.bfloat16 for p in uninterrupted.state.model.parameters()),
        'masters_identical_on_ranks': len(set(masters)) == 1,
        'resumed_equals_uninterrupted': resumed_equals_uninterrupted(uninterrupted.state.model, resumed.state.model)
        and masters == masters_resumed,
    }
    uninterrupted.close()
    resumed.close()
    write_from_rank_zero(out_path, result)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
