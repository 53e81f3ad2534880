"""Composer checkpoints written atomically: :class:`AtomicCheckpointSaver` writes each checkpoint file under a
temporary name renamed into place (:func:`~composer_thaw.utils.atomic_files.renamed_into_place`) and re-points the
``latest`` link in one step, so a kill during a save leaves the previous checkpoints and a link to the newest.

Example:
    >>> from composer import Trainer
    >>> from composer_thaw.datasets.builtin import python_topics_loader
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> model = tiny_decoder(num_layers=1)
    >>> trainer = Trainer(model=model, train_dataloader=python_topics_loader(model.tokenizer), max_duration='2ba',
    ...                   callbacks=[checkpoint_saver('runs/a', save_interval='1ba')], progress_bar=False)
    >>> trainer.fit()
    >>> sorted(os.listdir('runs/a')), os.readlink('runs/a/latest-rank0.pt')
    (['ep0-ba1-rank0.pt', 'ep0-ba2-rank0.pt', 'latest-rank0.pt'], 'ep0-ba2-rank0.pt')
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

from composer.callbacks import CheckpointSaver
from composer.core import State
from composer.loggers import Logger
from composer.utils import checkpoint as composer_checkpoint
from composer.utils import dist

from composer_thaw.utils.atomic_files import renamed_into_place, replace_symlink

__all__ = ['AtomicCheckpointSaver', 'checkpoint_saver']


@contextmanager
def _checkpoint_files_renamed_into_place() -> Iterator[None]:
    """While Composer saves a checkpoint, its single-file writer (``_write_checkpoint_file``: plain, compressed or
    tar) writes under a temporary name that is renamed into place. Sharded checkpoints are folders that
    ``torch.distributed.checkpoint`` completes by renaming its ``.metadata`` into place last."""
    write = composer_checkpoint._write_checkpoint_file

    def write_then_rename(state_dict: dict[str, Any], filename: str) -> None:
        with renamed_into_place(filename) as temporary:
            write(state_dict, str(temporary))

    composer_checkpoint._write_checkpoint_file = write_then_rename
    try:
        yield
    finally:
        composer_checkpoint._write_checkpoint_file = write


class AtomicCheckpointSaver(CheckpointSaver):
    """Composer's :class:`~composer.callbacks.CheckpointSaver`, with every checkpoint file written under a temporary
    name and renamed into place, and the ``latest`` link re-pointed in one step (Composer removes it, then links
    again: a kill in between leaves none, and ``autoresume`` would start over).

    A kill during a save leaves the previous checkpoints and a ``latest`` link to the newest of them; what the save
    had written is a hidden temporary file. Give it to the Trainer as a callback, with the same ``save_folder``
    for ``autoresume``; the arguments are :class:`~composer.callbacks.CheckpointSaver`'s.
    """

    def _save_checkpoint(self, state: State, logger: Logger) -> None:
        latest, keep = self.latest_filename, self.num_checkpoints_to_keep
        saved_before = len(self.saved_checkpoints)
        self.latest_filename, self.num_checkpoints_to_keep = None, -1  # linked and rotated below, in that order
        try:
            with _checkpoint_files_renamed_into_place():
                super()._save_checkpoint(state, logger)
        finally:
            self.latest_filename, self.num_checkpoints_to_keep = latest, keep
        if len(self.saved_checkpoints) == saved_before:  # this rank wrote no file
            return
        saved = Path(self.saved_checkpoints[-1])
        if (
            latest is not None
            and keep != 0
            and (dist.get_global_rank() == 0 or not state.fsdp_sharded_state_dict_enabled)
        ):
            link = Path(latest.format(state))
            link.parent.mkdir(parents=True, exist_ok=True)
            target = saved.parent if state.fsdp_sharded_state_dict_enabled else saved
            replace_symlink(link, os.path.relpath(target, link.parent))
        if keep >= 0:
            self._rotate_checkpoints(sharding_enabled=state.fsdp_sharded_state_dict_enabled)


def checkpoint_saver(save_folder: str, save_interval: Union[str, int], overwrite: bool = True) -> CheckpointSaver:
    """The saver ``Trainer(save_folder=..., save_interval=..., save_overwrite=...)`` would make, but atomic: the same
    file names (``ep{epoch}-ba{batch}-rank{rank}.pt``, ``latest-rank{rank}.pt``) and remote names."""
    filename, latest = 'ep{epoch}-ba{batch}-rank{rank}.pt', 'latest-rank{rank}.pt'
    return AtomicCheckpointSaver(
        folder=save_folder,
        filename=filename,
        remote_file_name=str(Path(save_folder) / filename),
        latest_filename=latest,
        latest_remote_file_name=str(Path(save_folder) / latest),
        save_interval=save_interval,
        overwrite=overwrite,
    )
