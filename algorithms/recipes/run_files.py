"""Files a run reads and writes, checked before anything is built: the save folder and the checkpoint to load.

A save folder that cannot be written would otherwise be discovered at the first save (with save-at-end, after
the whole run); a checkpoint that cannot be read, at load time with a message from deep inside ``torch.load``.
Each check raises :class:`~composer_thaw.core.validation.ConfigError` naming the recipe key and leaves nothing
behind: the probe file and any folders made for it are removed.

Example:
    >>> import os, torch
    >>> check_writable_folder('save_folder', 'runs/my-run')  # made, written, and removed again
    >>> os.path.exists('runs')
    False
    >>> os.makedirs('runs/my-run')
    >>> torch.save({'state': {}}, 'runs/my-run/ep1-ba100-rank0.pt')
    >>> check_checkpoint_path('load_path', 'runs/my-run/ep1-ba100-rank0.pt', sharded=False)
    >>> _ = open('runs/my-run/ep1-ba200-rank0.pt', 'wb').write(b'PK')  # a save cut short
    >>> check_checkpoint_path('load_path', 'runs/my-run/ep1-ba200-rank0.pt', sharded=False)
    Traceback (most recent call last):
    ConfigError: load_path = 'runs/my-run/ep1-ba200-rank0.pt': not a readable Composer checkpoint: the archive is
    truncated (a save that was interrupted?).
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Optional

from composer_thaw.core.validation import ConfigError
from composer_thaw.utils.atomic_files import replace_symlink, temporary_name

__all__ = [
    'check_checkpoint_path',
    'check_writable_folder',
    'checkpoint_to_resume',
    'complete_latest_link',
    'resume_from_a_complete_checkpoint',
]


def check_writable_folder(key: str, folder: str) -> None:
    """Raise unless files can be created in ``folder`` (made if missing); leave the file system as it was."""
    path = Path(folder).expanduser().absolute()
    missing = []
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise ConfigError(key, folder, f'{str(candidate)!r} is a file, so no folder can be made there.')
            break
        missing.append(candidate)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(path / 'write-probe')
        probe.write_bytes(b'')
        probe.unlink()
    except OSError as error:
        raise ConfigError(key, folder, f'cannot write there ({error.strerror or error}).') from error
    finally:
        for made in missing:  # innermost first
            if made.is_dir() and not any(made.iterdir()):
                made.rmdir()


def check_checkpoint_path(key: str, checkpoint: str, *, sharded: bool) -> None:
    """Raise unless ``checkpoint`` is a readable Composer checkpoint: a complete ``torch.save`` file, or, for
    sharded runs, a folder written by ``torch.distributed.checkpoint`` (it holds ``.metadata``)."""
    path = Path(checkpoint)
    latest = LATEST_LINK.search(path.name)
    if latest is not None and path.is_symlink():  # resumed from the newest complete checkpoint (see training.py)
        path = checkpoint_to_resume(str(path.parent), int(latest.group(1)), key) or path
    if not path.exists():
        raise ConfigError(key, checkpoint, 'no checkpoint file there.')
    if path.is_dir():
        if sharded and (path / '.metadata').is_file():
            return
        expected = (
            "a sharded checkpoint folder (one holding '.metadata')"
            if sharded
            else "a checkpoint file such as 'ep1-ba100-rank0.pt' (a folder is a sharded checkpoint only with "
            'parallelism.fsdp.state_dict_type: sharded)'
        )
        raise ConfigError(key, checkpoint, f'a folder; expected {expected}.')
    if sharded:  # torch.distributed.checkpoint reads only folders; a whole checkpoint reshards through 'full'
        raise ConfigError(
            key,
            checkpoint,
            'a whole-model checkpoint file, which a run with parallelism.fsdp.state_dict_type: sharded cannot read; '
            'set state_dict_type: full to load it sharded (at any number of processes), or give a sharded '
            "checkpoint folder (one holding '.metadata').",
        )
    if path.stat().st_size == 0:
        raise ConfigError(key, checkpoint, 'the file is empty (a save that was interrupted?).')
    problem = _unreadable_torch_file(path)
    if problem is not None:
        raise ConfigError(key, checkpoint, f'not a readable Composer checkpoint: {problem}.')


def _unreadable_torch_file(path: Path) -> Optional[str]:
    """Why ``torch.load`` could not read ``path``, judged from its framing without loading it; ``None`` if it can.

    ``torch.save`` writes a zip archive whose central directory comes last, so a save that was cut short leaves
    a file that starts like an archive but has none.
    """
    with path.open('rb') as file:
        head = file.read(4)
    if head.startswith(b'PK'):
        return None if zipfile.is_zipfile(path) else 'the archive is truncated (a save that was interrupted?)'
    if head[:1] == pickle.PROTO:  # a legacy (pre-zip) torch.save file
        return None
    return 'it is neither a torch.save archive nor a pickle (a text file?)'


LATEST_LINK = re.compile(r'latest-rank(\d+)\.pt$')  # the link Composer points at each new checkpoint


def checkpoint_to_resume(folder: str, rank: int = 0, key: str = 'autoresume') -> Optional[Path]:
    """The checkpoint a resume from ``folder`` reads: what ``latest-rank<rank>.pt`` links to, or, if a killed save
    left that incomplete, the newest complete checkpoint of that rank; ``None`` without a latest link. Changes nothing.

    Raises:
        ConfigError: (under ``key``) the latest checkpoint is incomplete and no complete one is left.
    """
    link = Path(folder) / f'latest-rank{rank}.pt'
    if not link.is_symlink():
        return link if link.is_file() else None
    target = link.parent / os.readlink(link)
    if target.is_dir() or _complete(target):  # a sharded checkpoint folder, or nothing wrong
        return target
    complete = [
        path
        for path in link.parent.glob(f'*-rank{rank}.pt')
        if not path.name.startswith('.') and not path.is_symlink() and _complete(path)  # '.': a save in progress
    ]
    if not complete:
        raise ConfigError(
            key,
            True if key == 'autoresume' else str(link),
            f'the latest checkpoint {str(target)!r} is incomplete (a save that was interrupted) and {folder!r} '
            'holds no complete one; start without it.',
        )
    return max(complete, key=_batches_done)


def resume_from_a_complete_checkpoint(folder: str, rank: int, key: str = 'autoresume') -> Optional[str]:
    """Before ``autoresume`` (or a ``load_path`` that is a latest link): if ``latest-rank<rank>.pt`` in ``folder``
    links to a checkpoint that a killed save left incomplete, link it to the newest complete checkpoint of that rank
    instead (atomically); say what changed, if anything.

    Raises:
        ConfigError: the latest checkpoint is incomplete and no complete one is left.
    """
    link = Path(folder) / f'latest-rank{rank}.pt'
    newest = checkpoint_to_resume(folder, rank, key)
    if newest is None or not link.is_symlink():
        return None
    target = link.parent / os.readlink(link)
    if newest == target:
        return None
    replace_symlink(link, newest.name)
    return (
        f'the latest checkpoint {target.name} is incomplete (a save that was interrupted); resuming from {newest.name}'
    )


def complete_latest_link(path: str) -> Optional[str]:
    """:func:`resume_from_a_complete_checkpoint` for a ``load_path`` that is a ``latest-rank<N>.pt`` link."""
    latest = LATEST_LINK.search(Path(path).name)
    if latest is None or not Path(path).is_symlink():
        return None
    return resume_from_a_complete_checkpoint(str(Path(path).parent), int(latest.group(1)), 'load_path')


def _complete(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0 and _unreadable_torch_file(path) is None


def _batches_done(path: Path) -> int:
    """The batch count in Composer's checkpoint names (``ep1-ba100-rank0.pt``), ``-1`` for other names."""
    match = re.search(r'ba(\d+)', path.name)
    return int(match.group(1)) if match else -1
