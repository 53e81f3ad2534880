"""Ctrl-C (SIGINT) or SIGTERM during training: finish the current batch, save a checkpoint, stop.

A signal handler that raised at once would stop the run wherever it was (halfway through an optimizer step, or
through a save), so the handler only takes note; at the end of the batch (``Event.BATCH_CHECKPOINT``, where
Composer's own saver runs) the run saves a checkpoint, if it has a saver that did not just save this batch, and
stops with :class:`TrainingInterrupted` (a ``KeyboardInterrupt``). A second signal interrupts at once. Composer 0.32
has no signal handling of its own.

Example:
    >>> with checkpoint_on_interrupt(trainer):
    ...     trainer.fit()  # kill -TERM <pid>: raises TrainingInterrupted once the batch's checkpoint is written
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Optional

from composer import Callback, Logger, State, Trainer
from composer.callbacks import CheckpointSaver
from composer.utils import dist

__all__ = ['TrainingInterrupted', 'checkpoint_on_interrupt']

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped at a batch boundary on a signal; ``checkpoint`` is what was saved there (``None`` if
    nothing: the run has no save folder)."""

    def __init__(self, signal_number: int, batch: int, checkpoint: Optional[str]):
        self.signal_number, self.batch, self.checkpoint = signal_number, batch, checkpoint
        super().__init__(f'{signal.Signals(signal_number).name} at batch {batch}')


class _SaveAndStop(Callback):
    def __init__(self) -> None:
        self.signal_number: Optional[int] = None

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        if self.signal_number is None:
            return
        saver = next((c for c in state.callbacks if isinstance(c, CheckpointSaver)), None)
        checkpoint = None
        if saver is not None:
            if saver.last_checkpoint_batch != state.timestamp.batch:  # not saved at this batch yet
                saver._save_checkpoint(state, logger)  # the saver's own save: same names, latest link, atomic
            checkpoint = saver.saved_checkpoints[-1] if saver.saved_checkpoints else None
        raise TrainingInterrupted(self.signal_number, int(state.timestamp.batch), checkpoint)


@contextmanager
def checkpoint_on_interrupt(trainer: Trainer) -> Iterator[None]:
    """While the block runs (``trainer.fit()``), SIGINT and SIGTERM save a checkpoint at the end of the current
    batch and raise :class:`TrainingInterrupted`; outside it, the previous handlers are back.

    Only in a single process, from the main thread: across processes the ranks would have to agree on the batch
    to stop at. Elsewhere the block runs unchanged.
    """
    if dist.get_world_size() > 1 or threading.current_thread() is not threading.main_thread():
        yield
        return
    callback = _SaveAndStop()

    def take_note(signal_number: int, frame: Optional[FrameType]) -> Any:
        if callback.signal_number is not None:  # the second one: stop now
            raise KeyboardInterrupt
        callback.signal_number = signal_number

    previous = {number: signal.signal(number, take_note) for number in SIGNALS}
    trainer.state.callbacks.append(callback)  # last: after the saver, which may have saved this batch already
    try:
        yield
    finally:
        trainer.state.callbacks.remove(callback)
        for number, handler in previous.items():
            signal.signal(number, handler)
