"""A callback for 2-process scripts: what every rank saw and holds, batch by batch, gathered across ranks."""

from __future__ import annotations

import hashlib

from composer import Callback
from composer.utils import dist

from composer_thaw.parameter_selection import user_module
from composer_thaw.training import parameter_checksum


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
