"""HiFT's visiting order: a queue of units; each switch takes the first ``group_size`` units and moves them to the tail.

A *pass* is ``len(units) // group_size`` switches (HiFT's counter). When ``group_size`` does not divide the number
of units, the queue is not back at its start after a pass, so groups shift from one pass to the next, exactly as
in the ``hift`` package (7 units in groups of 2: ``[0 1] [2 3] [4 5]``, then ``[6 0] [1 2] [3 4]``, ...).

Strategies fix the queue's order: ``down2up`` (model order, embeddings first), ``up2down`` (reversed), ``random``
(a fresh permutation at the start of every pass, drawn from a generator seeded with the run's rank-zero seed, so
every rank visits the same groups).

Example:
    >>> queue = GroupQueue([0, 1, 2, 3], group_size=2, strategy='up2down', seed=0)
    >>> [queue.next_group()[0] for _ in range(3)]
    [(3, 2), (1, 0), (3, 2)]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

__all__ = ['STRATEGIES', 'GroupQueue', 'Strategy']

Strategy = Literal['down2up', 'up2down', 'random']
STRATEGIES: tuple[str, ...] = ('down2up', 'up2down', 'random')


class GroupQueue:
    """The rotation order over ``units`` (unit indices in model order); :meth:`next_group` makes one switch."""

    def __init__(self, units: Sequence[int], group_size: int, strategy: Strategy, seed: int = 0):
        if strategy not in STRATEGIES:
            raise ValueError(f'strategy={strategy!r} is not supported; choose one of {list(STRATEGIES)}.')
        if not 1 <= group_size <= len(units):
            raise ValueError(f'group_size={group_size} must be between 1 and the number of units ({len(units)}).')
        self.units = tuple(units)
        self.group_size = group_size
        self.strategy = strategy
        self.generator = torch.Generator().manual_seed(seed)
        self.queue: list[int] = list(reversed(self.units)) if strategy == 'up2down' else list(self.units)
        self.switches_in_pass = 0
        self.passes = 0  # passes begun

    @property
    def groups_per_pass(self) -> int:
        return len(self.units) // self.group_size

    def next_group(self) -> tuple[tuple[int, ...], bool]:
        """Take the next group off the head of the queue and append it to the tail.

        Returns:
            ``(group, new_pass)``: the unit indices now active and whether this switch begins a pass.
        """
        new_pass = self.passes == 0 or self.switches_in_pass == self.groups_per_pass
        if new_pass:
            self.switches_in_pass = 0
            self.passes += 1
            if self.strategy == 'random':
                order = torch.randperm(len(self.units), generator=self.generator).tolist()
                self.queue = [self.units[i] for i in order]
        group = tuple(self.queue[: self.group_size])
        self.queue = self.queue[self.group_size :] + list(group)
        self.switches_in_pass += 1
        return group, new_pass

    def first_pass(self) -> list[tuple[int, ...]]:
        """The groups of the next pass (or the first, before any switch), without advancing; ``random`` is not known
        in advance (returns the groups in queue order)."""
        queue = list(self.queue)
        groups = []
        for _ in range(self.groups_per_pass):
            groups.append(tuple(queue[: self.group_size]))
            queue = queue[self.group_size :] + queue[: self.group_size]
        return groups

    def state_dict(self) -> dict[str, Any]:
        return {
            'queue': list(self.queue),
            'switches_in_pass': self.switches_in_pass,
            'passes': self.passes,
            'generator': self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        queue = [int(i) for i in state['queue']]
        if sorted(queue) != sorted(self.units):
            raise ValueError(f"The checkpoint queue {queue} does not hold this rotation's units {list(self.units)}.")
        self.queue = queue
        self.switches_in_pass = int(state['switches_in_pass'])
        self.passes = int(state['passes'])
        self.generator.set_state(state['generator'])
