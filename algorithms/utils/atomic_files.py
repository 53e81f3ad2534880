"""Files that appear whole or not at all: each is written under a temporary name in its folder, flushed to disk and
renamed into place (``os.replace``, atomic on POSIX), so a run killed while saving never leaves a file that looks
complete but is not.

Used for Composer checkpoints and their ``latest`` links (:class:`AtomicCheckpointSaver`, which ``thaw run``
uses), LoRA exports (adapter folders, merged models) and result files.

Example:
    >>> atomic_write_text('results/run.json', json.dumps(summary))
    >>> with atomic_directory('exports/adapter') as staging:
    ...     save_pretrained(staging)  # appears in exports/adapter only once every file is written
    >>> trainer = Trainer(..., save_folder='runs/a', callbacks=[AtomicCheckpointSaver('runs/a', save_interval='100ba')])
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union

from composer.callbacks import CheckpointSaver
from composer.core import State
from composer.loggers import Logger
from composer.utils import checkpoint as composer_checkpoint
from composer.utils import dist

__all__ = ['AtomicCheckpointSaver', 'atomic_directory', 'atomic_write_text', 'replace_symlink', 'temporary_name']

PathLike = Union[str, os.PathLike]


def temporary_name(path: PathLike) -> Path:
    """Where ``path`` is written before it is renamed into place: a hidden name in the same folder (so the rename
    stays on one file system) that keeps the extension (Composer picks compression by it)."""
    path = Path(path)
    return path.with_name(f'.{os.getpid()}.tmp.{path.name}')


def _flush_to_disk(path: Path) -> None:
    with path.open('rb') as file:
        os.fsync(file.fileno())


@contextmanager
def _renamed_into_place(path: PathLike) -> Iterator[Path]:
    """Yield the temporary path to write; on success flush it and rename it to ``path``, on failure remove it."""
    temporary = temporary_name(path)
    try:
        yield temporary
        _flush_to_disk(temporary)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def replace_symlink(link: Path, target: str) -> None:
    """Point ``link`` at ``target`` in one step: a new link under its :func:`temporary_name`, renamed over the old
    one, so a kill at any moment leaves either the old link or the new one, never none."""
    temporary = temporary_name(link)
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(target)
    os.replace(temporary, link)


def atomic_write_text(path: PathLike, text: str) -> None:
    """``Path(path).write_text(text)``, with the folder made if missing and the file replaced in one step."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with _renamed_into_place(path) as temporary:
        temporary.write_text(text)


@contextmanager
def atomic_directory(directory: PathLike) -> Iterator[Path]:
    """Yield a staging folder; once the block ends without error its files move into ``directory``.

    A new ``directory`` appears in one rename. Into an existing one (which may hold other files) each file is renamed
    over its old version, so every file there is whole; on an error nothing moves and the staging folder is removed.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_name(directory)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        for file in staging.rglob('*'):
            if file.is_file():
                _flush_to_disk(file)
        if not directory.exists():
            os.replace(staging, directory)
            return
        for file in sorted(staging.rglob('*'), key=lambda p: len(p.parts)):
            target = directory / file.relative_to(staging)
            if file.is_dir():
                target.mkdir(exist_ok=True)
            else:
                os.replace(file, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


@contextmanager
def _checkpoint_files_renamed_into_place() -> Iterator[None]:
    """While Composer saves a checkpoint, its single-file writer (``_write_checkpoint_file``: plain, compressed or
    tar) writes under a temporary name that is renamed into place. Sharded checkpoints are folders that
    ``torch.distributed.checkpoint`` completes by renaming its ``.metadata`` into place last."""
    write = composer_checkpoint._write_checkpoint_file

    def write_then_rename(state_dict: dict[str, Any], filename: str) -> None:
        with _renamed_into_place(filename) as temporary:
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
