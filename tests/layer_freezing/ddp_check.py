"""Run under ``composer -n 2``: LayerFreezing under DDP keeps ranks bit-identical and resumes exactly.

One launch checks, on 2 CPU processes (gloo), with each rank reading different data:
* after every batch (freezing happens mid-run, every 2 batches), all parameters are bit-identical on both ranks;
* frozen parameters never hold a gradient after backward;
* a run resumed at world size 2 from a checkpoint saved after freezing began ends bit-identical to the
  uninterrupted run.
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
from composer_thaw.layer_freezing import LayerFreezing
from composer_thaw.models import load_tokenizer, tiny_decoder
from composer_thaw.parameter_selection import user_module
from composer_thaw.training import parameter_checksum


class Checks(RankChecks):
    """RankChecks plus how many parameters are frozen after each batch."""

    def __init__(self):
        super().__init__()
        self.frozen_counts = []

    def batch_end(self, state, logger):
        super().batch_end(state, logger)
        self.frozen_counts.append(sum(1 for p in user_module(state.model).parameters() if not p.requires_grad))


def train(save_folder: str, load_path: str | None, seed: int) -> tuple[torch.nn.Module, Checks]:
    tokenizer = load_tokenizer()
    dataset = LanguageModelingDataset(python_topics_corpus()[0], tokenizer, max_seq_len=32, max_blocks=16)
    loader = build_dataloader(dataset, tokenizer, batch_size=2, shuffle=True, drop_last=True)  # 4 batches per rank
    torch.manual_seed(seed)
    model = tiny_decoder('llama', num_layers=3, hidden_size=32, num_heads=4)
    checks = Checks()
    Trainer(
        model=model,
        train_dataloader=loader,
        max_duration='2ep',
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
        algorithms=[LayerFreezing(freeze_start=0.0, freeze_level=0.75, granularity='block', interval=2)],
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

    batch_digests = dist.all_gather_object(checks.first_batch_digest)
    final = dist.all_gather_object(parameter_checksum(uninterrupted))
    final_resumed = dist.all_gather_object(parameter_checksum(resumed))
    result = {
        'world_size': dist.get_world_size(),
        'ranks_read_different_data': len(set(batch_digests)) == dist.get_world_size(),
        'ranks_identical_after_every_batch': all(checks.ranks_identical) and len(checks.ranks_identical) == 8,
        'frozen_params_per_batch': checks.frozen_counts,
        'frozen_params_with_grad': checks.frozen_grads + resumed_checks.frozen_grads,
        'resumed_ranks_identical_after_every_batch': all(resumed_checks.ranks_identical),
        'resumed_equals_uninterrupted': final == final_resumed and len(set(final)) == 1,
    }
    if dist.get_global_rank() == 0:
        with open(out_path, 'w') as f:
            json.dump(result, f, indent=1)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
