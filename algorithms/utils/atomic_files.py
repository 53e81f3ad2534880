"""Files that appear whole or not at all: each is written under a temporary name in its folder, flushed to disk and
renamed into place (``os.replace``, atomic on POSIX), so a run killed while saving never leaves a file that looks
complete but is not.

Used for Composer checkpoints and their ``latest`` links
(:class:`~composer_thaw.utils.atomic_checkpoints.AtomicCheckpointSaver`, which ``thaw run`` uses), LoRA exports
(adapter folders, merged models) and result files. Imports nothing heavy: a recipe's file checks use it before
Composer loads.

Example:
    >>> atomic_write_text('results/run.json', '{"loss": 1.25}')
    >>> with atomic_directory('exports/adapter') as staging:  # a save_pretrained(staging) would write here
    ...     _ = (staging / 'adapter_config.json').write_text('{"r": 8}')
    ...     os.path.exists('exports/adapter')  # it appears only once every file is written
    False
    >>> sorted(os.listdir('exports/adapter')), os.listdir('results')
    (['adapter_config.json'], ['run.json'])
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Union

__all__ = ['atomic_directory', 'atomic_write_text', 'renamed_into_place', 'replace_symlink', 'temporary_name']

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
def renamed_into_place(path: PathLike) -> Iterator[Path]:
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
    with renamed_into_place(path) as temporary:
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
