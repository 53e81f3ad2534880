"""Callbacks that watch a HiFT run step by step (callbacks run after algorithms at each event)."""

from __future__ import annotations

import torch
from composer import Callback

from composer_thaw.utils.optimizer_surgery import optimizer_state_bytes
from composer_thaw.utils.parameter_selection import user_module


def trainable_names(model) -> list[str]:
    return [name for name, p in user_module(model).named_parameters() if p.requires_grad]


class StepWatcher(Callback):
    """At every step: which parameters train, which changed, which had gradients, what the optimizer holds."""

    def __init__(self):
        self.trainable: list[list[str]] = []  # per step, at BATCH_START (after the algorithm switched)
        self.changed: list[list[str]] = []  # per step, parameters whose values changed in the step
        self.with_grad: list[list[str]] = []  # per step, after backward
        self.microbatch_trainable: list[list[list[str]]] = []  # per step, per microbatch forward
        self.state_names: list[list[str]] = []  # per step, parameters with optimizer state after the step
        self.state_bytes: list[int] = []
        self.lrs: list[list[float]] = []  # per step, the learning rates the optimizer step uses
        self._before: dict[str, torch.Tensor] = {}

    def batch_start(self, state, logger):
        self.trainable.append(trainable_names(state.model))
        self.microbatch_trainable.append([])
        self._before = {n: p.detach().clone() for n, p in user_module(state.model).named_parameters()}

    def before_forward(self, state, logger):
        self.microbatch_trainable[-1].append(trainable_names(state.model))

    def after_train_batch(self, state, logger):
        self.with_grad.append([n for n, p in user_module(state.model).named_parameters() if p.grad is not None])
        self.lrs.append([group['lr'] for group in state.optimizers[0].param_groups])

    def batch_end(self, state, logger):
        params = dict(user_module(state.model).named_parameters())
        self.changed.append([n for n, p in params.items() if not torch.equal(p, self._before[n])])
        names = {id(p): n for n, p in params.items()}
        optimizer = state.optimizers[0]
        self.state_names.append(sorted(names[id(p)] for p in optimizer.state))
        self.state_bytes.append(optimizer_state_bytes(optimizer))
