"""Run under ``composer -n 2`` (a part of tests/two_processes.py): ``master_weights='fp32'`` under DDP.

A bf16 decoder trained by HiFTRotation (``random`` strategy, group_size 2) with fp32 masters, each rank reading
different data: after every batch the bf16 weights are bit-identical on both ranks and every master, cast, equals its
weight; at the end the masters are identical on both ranks; a run resumed at world size 2 mid-run ends bit-identical
to the uninterrupted one. Rank 0 writes the findings as JSON to the path given as the first argument.
"""

from __future__ import annotations

import hashlib
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
from composer_thaw.hift_rotation import HiFTRotation
from composer_thaw.master_weights import master_weights_of
from composer_thaw.models import load_tokenizer, tiny_decoder
from composer_thaw.training import parameter_checksum


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
    tokenizer = load_tokenizer()
    dataset = LanguageModelingDataset(python_topics_corpus()[0], tokenizer, max_seq_len=32, max_blocks=24)
    loader = build_dataloader(dataset, tokenizer, batch_size=2, shuffle=True, drop_last=True)  # 6 batches per rank
    torch.manual_seed(seed)
    model = tiny_decoder('llama', num_layers=3, hidden_size=32, num_heads=4).to(torch.bfloat16)
    checks = Checks()
    trainer = Trainer(
        model=model,
        train_dataloader=loader,
        max_duration='8ba',
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
        algorithms=[HiFTRotation(group_size=2, strategy='random', master_weights='fp32')],
        callbacks=[checks],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
        seed=17,
        save_folder=save_folder if load_path is None else None,
        save_interval='4ba',
        load_path=load_path,
    )
    trainer.fit()
    return trainer, checks


def main(out_path: str, folder: str) -> None:
    uninterrupted, checks = train(folder, None, seed=0)
    dist.barrier()
    resumed, resumed_checks = train(folder, os.path.join(folder, 'ep0-ba4-rank0.pt'), seed=1)
    final = dist.all_gather_object(parameter_checksum(uninterrupted.state.model))
    final_resumed = dist.all_gather_object(parameter_checksum(resumed.state.model))
    masters = dist.all_gather_object(_master_digest(uninterrupted))
    masters_resumed = dist.all_gather_object(_master_digest(resumed))
    result = {
        'world_size': dist.get_world_size(),
        'ranks_read_different_data': checks.ranks_read_different_data(),
        'batches': len(checks.ranks_identical),
        'ranks_identical_after_every_batch': all(checks.ranks_identical + resumed_checks.ranks_identical),
        'masters_are_weights_after_every_batch': all(checks.masters_are_weights + resumed_checks.masters_are_weights),
        'masters_held': min(checks.master_bytes) > 0,
        'weights_bf16': all(p.dtype == torch.bfloat16 for p in uninterrupted.state.model.parameters()),
        'masters_identical_on_ranks': len(set(masters)) == 1,
        'resumed_equals_uninterrupted': final == final_resumed and len(set(final)) == 1 and masters == masters_resumed,
    }
    uninterrupted.close()
    resumed.close()
    if dist.get_global_rank() == 0:
        with open(out_path, 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
