"""Stop training at the first non-finite loss, naming the batch and the value, before it reaches the weights.

A learning rate far too high, a bad batch or an overflow in low precision makes the loss ``nan`` or ``inf``; from
there every later step only spreads it, and Composer would train to the end and exit normally. ``StopOnNonFiniteLoss``
raises :class:`NonFiniteLossError` at ``Event.AFTER_LOSS`` of the microbatch whose loss is not finite, so the
backward pass and the optimizer step of that batch never run (the last checkpoint stays the last good state).
``thaw run`` adds it to every run and reports the error in one line with a non-zero exit.

Example:
    >>> from composer import Trainer
    >>> from composer_thaw.datasets.builtin import python_topics_loader
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> model = tiny_decoder(num_layers=1)
    >>> with torch.no_grad():
    ...     model.model.lm_head.weight[0, 0] = float('nan')  # as an overflow would leave it
    >>> trainer = Trainer(model=model, train_dataloader=python_topics_loader(model.tokenizer), max_duration='2ba',
    ...                   callbacks=[StopOnNonFiniteLoss()], progress_bar=False)
    >>> trainer.fit()
    Traceback (most recent call last):
    NonFiniteLossError: the loss of training batch 1 is nan; training stopped before that batch changed any weight. ...
"""

from __future__ import annotations

import math

import torch
from composer.core import Callback, State
from composer.loggers import Logger

__all__ = ['NonFiniteLossError', 'StopOnNonFiniteLoss']


class NonFiniteLossError(RuntimeError):
    """The loss of a training batch is ``nan`` or ``inf``.

    Attributes:
        batch: the 1-based training batch whose loss it is.
        value: the loss (``nan``, ``inf`` or ``-inf``).
    """

    def __init__(self, batch: int, value: float):
        self.batch, self.value = batch, value
        super().__init__(
            f'the loss of training batch {batch} is {value}; training stopped before that batch changed any weight. '
            'Lower the learning rate (optimizer.lr) or check the data and the model (e.g. fp16 overflow).',
        )


class StopOnNonFiniteLoss(Callback):
    """Raise :class:`NonFiniteLossError` as soon as a microbatch's loss is not finite (see the module docstring)."""

    def after_loss(self, state: State, logger: Logger) -> None:
        losses = state.loss if isinstance(state.loss, (tuple, list)) else [state.loss]
        for loss in losses:
            if isinstance(loss, dict):  # a model returning several named losses
                values = list(loss.values())
            else:
                values = [loss]
            for value in values:
                if isinstance(value, torch.Tensor) and not bool(torch.isfinite(value.detach()).all()):
                    number = value.detach().float().flatten()
                    bad = number[~torch.isfinite(number)][0].item()
                    raise NonFiniteLossError(int(state.timestamp.batch) + 1, bad)
                if isinstance(value, float) and not math.isfinite(value):
                    raise NonFiniteLossError(int(state.timestamp.batch) + 1, value)
