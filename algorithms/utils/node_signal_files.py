"""One signal file per node where Composer meant one: a fix for ``autoresume`` on several nodes sharing a save folder.

While the Trainer looks for an ``autoresume`` checkpoint, Composer 0.32 has local rank 0 of each node write a signal
file into the save folder, the node's other ranks wait for it, and local rank 0 removes it. The file's name is meant
to name its node (``._signal_file_node<node rank>_<random>``), but ``composer.utils.dist.get_node_signal_file_name``
broadcasts the whole name from rank 0, so every node gets node 0's name: on a folder all nodes see (what a sharded
checkpoint needs) the second node to remove it fails with ``FileNotFoundError`` and the run cannot start, the first
time and on every resume. :func:`per_node_signal_files` keeps the random part rank 0 chose and puts this node's rank
back into the name.

Build the Trainer (``Trainer(..., autoresume=True)``) inside the block, on each node.

Example:
    >>> from unittest import mock
    >>> with per_node_signal_files(), mock.patch.object(dist, 'get_node_rank', return_value=1):  # as on node 1
    ...     dist.get_node_signal_file_name()  # Composer's own gives rank 0's name, with node0, on every node
    '._signal_file_node1_...'
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from random import Random
from typing import Optional

from composer.utils import dist

__all__ = ['per_node_signal_files']


@contextmanager
def per_node_signal_files() -> Iterator[None]:
    """While the block runs, ``composer.utils.dist.get_node_signal_file_name`` names this node's file."""
    composers = dist.get_node_signal_file_name

    def this_nodes(rng: Optional[Random] = None) -> str:
        name = composers(rng)  # every rank takes part in its broadcast
        return re.sub(r'_node\d+_', f'_node{dist.get_node_rank()}_', name, count=1)

    dist.get_node_signal_file_name = this_nodes
    try:
        yield
    finally:
        dist.get_node_signal_file_name = composers
