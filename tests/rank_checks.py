"""For the 2-process scripts (tests/two_processes.py's parts): a callback recording what every rank saw and holds,
batch by batch, gathered across ranks; the Trainer each script runs; rank 0 writing the findings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Optional

import torch
from composer import Callback, Trainer
from composer.utils import dist

from composer_thaw.datasets.builtin import LanguageModelingDataset, build_dataloader, python_topics_corpus
from composer_thaw.models.builtin import load_tokenizer
from composer_thaw.recipes.running import parameter_checksum
from composer_thaw.utils.parameter_selection import user_module


class RankChecks(Callback):
    """Records whether ranks stay bit-identical after every batch and whether a frozen parameter held a gradient.

    ``first_batch_digest`` (a hash of this rank's first batch) tells whether ranks read different data, which is
    what makes identical parameters evidence that gradients were all-reduced.
    """

    def __init__(self) -> None:
        self.first_batch_digest: str | None = None
        self.ranks_identical: list[bool] = []
        self.frozen_grads = 0

    def after_dataloader(self, state, logger) -> None:
        if self.first_batch_digest is None:
            self.first_batch_digest = hashlib.sha256(state.batch['input_ids'].numpy().tobytes()).hexdigest()

    def after_train_batch(self, state, logger) -> None:  # gradients are all-reduced by now
        self.frozen_grads += sum(
            1 for p in user_module(state.model).parameters() if not p.requires_grad and p.grad is not None
        )

    def batch_end(self, state, logger) -> None:
        self.ranks_identical.append(len(set(dist.all_gather_object(parameter_checksum(state.model)))) == 1)

    def ranks_read_different_data(self) -> bool:
        return len(set(dist.all_gather_object(self.first_batch_digest))) == dist.get_world_size()


def resumed_equals_uninterrupted(uninterrupted: torch.nn.Module, resumed: torch.nn.Module) -> bool:
    """Whether the resumed model ends bit-identical to the uninterrupted one, and both are the same on every rank."""
    final = dist.all_gather_object(parameter_checksum(uninterrupted))
    return final == dist.all_gather_object(parameter_checksum(resumed)) and len(set(final)) == 1


def rank_trainer(
    model: torch.nn.Module,
    algorithms: Sequence[Any],
    checks: RankChecks,
    *more_callbacks: Any,
    blocks: int,
    save_folder: Optional[str],
    load_path: Optional[str],
    batch_size: int = 2,
    max_duration: str = '2ep',
    save_interval: str = '4ba',
    **options: Any,
) -> Trainer:
    """A CPU Trainer on the LM corpus (``blocks`` blocks of 32 tokens, each rank reading its own ``batch_size``
    batches), AdamW at lr 1e-2, seed 17, saving to ``save_folder`` unless it resumes from ``load_path``."""
    tokenizer = load_tokenizer()
    dataset = LanguageModelingDataset(python_topics_corpus()[0], tokenizer, max_seq_len=32, max_blocks=blocks)
    loader = build_dataloader(dataset, tokenizer, batch_size=batch_size, shuffle=True, drop_last=True)
    return Trainer(
        model=model,
        train_dataloader=loader,
        max_duration=max_duration,
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
        algorithms=list(algorithms),
        callbacks=[checks, *more_callbacks],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
        seed=17,
        save_folder=save_folder if load_path is None else None,
        save_interval=save_interval,
        load_path=load_path,
        **options,
    )


def write_from_rank_zero(path: str, result: dict[str, Any]) -> None:
    if dist.get_global_rank() == 0:
        with open(path, 'w') as file:
            json.dump(result, file, indent=1)
