"""Ctrl-C (SIGINT) or SIGTERM during training: finish the current batch, save a checkpoint, stop.

A signal handler that raised at once would stop the run wherever it was (halfway through an optimizer step, or
through a save), so the handler only takes note; at the end of the batch (``Event.BATCH_CHECKPOINT``, where
Composer's own saver runs) the run saves a checkpoint, if it has a saver that did not just save this batch, and
stops with :class:`TrainingInterrupted` (a ``KeyboardInterrupt``). The same signal a second time interrupts at once;
another one is the same request (Composer's launcher follows the terminal's Ctrl-C with a SIGTERM to every process).
Composer 0.32 has no signal handling of its own.

Across processes (DDP, FSDP2) the ranks agree at each batch's end on whether any of them was signalled (one
all-reduce of a number), so a signal that reached one rank only stops all of them at the same batch, where they
save one checkpoint together.

``thaw run --nproc N`` (and each node of ``--nnodes``) starts Composer's launcher in a session of its own
(:func:`composer_thaw.recipes.launching.run_launcher`), so that every signal reaches the ranks one way: a terminal's
Ctrl-C, a SIGTERM (``kill``, a container runtime stopping its main process) or a SIGHUP reaches ``thaw`` alone,
which passes it on to the launcher (:mod:`composer_thaw.recipes.node_launcher`), which sends SIGTERM to every rank
of its node and waits for them; ``thaw`` then prints what was saved and the command that resumes, last. A signal to
one node stops the ranks of every node at the same batch: the ranks of the other nodes stop too, and their launchers
and ``thaw`` end the same way.

Example:
    >>> from composer import Callback, Trainer
    >>> from composer_thaw.datasets.builtin import python_topics_loader
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> class KillDuringBatch2(Callback):  # as `kill -TERM <pid>` would, in the middle of the second batch
    ...     def after_forward(self, state, logger):
    ...         if state.timestamp.batch == 1:
    ...             os.kill(os.getpid(), signal.SIGTERM)
    >>> model = tiny_decoder(num_layers=1)
    >>> trainer = Trainer(model=model, train_dataloader=python_topics_loader(model.tokenizer), max_duration='4ba',
    ...                   save_folder='runs/a', callbacks=[KillDuringBatch2()], progress_bar=False)
    >>> try:
    ...     with checkpoint_on_interrupt(trainer):
    ...         trainer.fit()
    ... except TrainingInterrupted as stop:
    ...     print(stop, stop.checkpoint)
    SIGTERM at batch 2 runs/a/ep0-ba2-rank0.pt
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any, Optional

import torch
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

    def _signal_on_any_rank(self, state: State) -> Optional[int]:
        """This rank's signal, or across ranks the highest signal number any rank noted (every rank calls it)."""
        if dist.get_world_size() == 1:
            return self.signal_number
        flag = state.device.tensor_to_device(torch.tensor([self.signal_number or 0]))
        dist.all_reduce(flag, reduce_operation='MAX')
        return int(flag.item()) or None

    def batch_checkpoint(self, state: State, logger: Logger) -> None:
        signal_number = self._signal_on_any_rank(state)
        if signal_number is None:
            return
        saver = next((c for c in state.callbacks if isinstance(c, CheckpointSaver)), None)
        checkpoint = None
        if saver is not None:
            if saver.last_checkpoint_batch != state.timestamp.batch:  # not saved at this batch yet
                saver._save_checkpoint(state, logger)  # the saver's own save: same names, latest link, atomic
            checkpoint = saver.saved_checkpoints[-1] if saver.saved_checkpoints else None
            if checkpoint is not None and state.fsdp_sharded_state_dict_enabled:  # a folder of every rank's shards
                checkpoint = os.path.dirname(checkpoint)
        if dist.get_world_size() > 1:  # rank 0's: only it writes a checkpoint that is not sharded
            checkpoint = dist.all_gather_object(checkpoint)[0]
        raise TrainingInterrupted(signal_number, int(state.timestamp.batch), checkpoint)


@contextmanager
def checkpoint_on_interrupt(trainer: Trainer) -> Iterator[None]:
    """While the block runs (``trainer.fit()``), SIGINT and SIGTERM save a checkpoint at the end of the current
    batch and raise :class:`TrainingInterrupted` on every rank; outside it, the previous handlers are back.

    Called from the main thread only (Python delivers signals there); elsewhere the block runs unchanged.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    callback = _SaveAndStop()

    def take_note(signal_number: int, frame: Optional[FrameType]) -> Any:
        if callback.signal_number == signal_number:  # the same signal again: stop now
            raise KeyboardInterrupt
        if callback.signal_number is None:
            callback.signal_number = signal_number

    previous = {number: signal.signal(number, take_note) for number in SIGNALS}
    trainer.state.callbacks.append(callback)  # last: after the saver, which may have saved this batch already
    try:
        yield
    finally:
        trainer.state.callbacks.remove(callback)
        for number, handler in previous.items():
            signal.signal(number, handler)
