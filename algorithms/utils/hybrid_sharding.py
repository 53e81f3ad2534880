"""Hybrid sharding (HSDP) with Composer's FSDP2: parameters sharded within a group of processes and that group
replicated across the others (a 2-D device mesh, replicas x shards).

Composer 0.32.1 builds FSDP2's device mesh from the config's ``data_parallel_replicate_degree`` and
``data_parallel_shard_degree``, but its :class:`~composer.utils.parallelism.FSDP2Config` fixes them to ``None`` and
``-1`` (read-only properties) and overwrites a ``device_mesh`` given to it with a 1-D mesh, so FSDP2 always shards
across every process. :class:`HSDPConfig` is an ``FSDP2Config`` whose two degrees are fields: Composer then builds the
``(data_parallel_replicate, data_parallel_shard)`` mesh, FSDP2 shards within a replica group and all-reduces across
groups, and Composer's sharded checkpoints are written by the first replica and read by every one.

Two fixes make it train on CPU (gloo), and every ``HSDPConfig`` applies them: FSDP2's HSDP all-reduce asserts that
the stream recorded an event, which torch's CPU stream stub never does (:func:`record_cpu_stream_events`), and gloo
sums where FSDP2 asks for an average (:func:`~composer_thaw.utils.sharding.average_gradients_on_gloo`).

Example:
    >>> from composer_thaw.utils.hybrid_sharding import HSDPConfig
    >>> config = HSDPConfig(data_parallel_replicate_degree=2)  # 2 replicas, each sharded over half the processes
    >>> config.data_parallel_replicate_degree, config.data_parallel_shard_degree
    (2, -1)
    >>> HSDPConfig(data_parallel_shard_degree=0)
    Traceback (most recent call last):
    ValueError: data_parallel_shard_degree=0: expected a positive number of processes per replica, or -1 for the world
    size divided by the replicas.

    The Trainer takes it as its FSDP2 config. That needs the run's processes (four here, two on each of two nodes:
    ``composer --world_size 4 --nproc 2 --node_rank {0,1} ...``, each node a replica, shards within the node), so
    this line is not run as a test:

    >>> trainer = Trainer(model=model, ..., parallelism_config={'fsdp': config})  # doctest: +SKIP
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from composer.utils.parallelism import FSDP2Config

from composer_thaw.utils.sharding import average_gradients_on_gloo

__all__ = ['HSDPConfig', 'record_cpu_stream_events']


@dataclass
class HSDPConfig(FSDP2Config):
    """FSDP2 over ``data_parallel_replicate_degree`` replicas of ``data_parallel_shard_degree`` shards each; every
    other field is :class:`~composer.utils.parallelism.FSDP2Config`'s.

    Args:
        data_parallel_replicate_degree: how many copies of the sharded model (typically the number of nodes).
        data_parallel_shard_degree: over how many processes each copy is sharded (typically the processes of a
            node); ``-1`` for the world size divided by the replicas.
    """

    # These shadow FSDP2Config's read-only properties of the same names, which Composer's State reads.
    data_parallel_replicate_degree: Optional[int] = 1
    data_parallel_shard_degree: int = -1

    def __post_init__(self) -> None:
        super().__post_init__()
        replicas, shards = self.data_parallel_replicate_degree, self.data_parallel_shard_degree
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            raise ValueError(f'data_parallel_replicate_degree={replicas!r}: expected a positive number of replicas.')
        if not isinstance(shards, int) or isinstance(shards, bool) or (shards < 1 and shards != -1):
            raise ValueError(
                f'data_parallel_shard_degree={shards!r}: expected a positive number of processes per replica, or -1 '
                'for the world size divided by the replicas.'
            )
        record_cpu_stream_events()
        average_gradients_on_gloo()


def record_cpu_stream_events() -> None:
    """Make ``torch.cpu.Stream.record_event`` return a (complete) ``torch.cpu.Event`` instead of ``None``. Idempotent.

    FSDP2's HSDP backward asserts that its all-reduce stream recorded an event
    (``FSDPParamGroup.post_backward``: ``assert all_reduce_event is not None``); on CPU the stream is a stub whose
    ``record_event`` returns nothing, so every HSDP step on CPU failed there. Work on CPU is synchronous, so an event
    that is always complete is the right answer; waiting on it stays a no-op.
    """
    import torch

    stream = torch.cpu.Stream
    if getattr(stream.record_event, 'records_events', False):
        return

    def record_event(self: Any) -> torch.cpu.Event:
        return torch.cpu.Event()

    record_event.records_events = True  # type: ignore[attr-defined]
    stream.record_event = record_event  # type: ignore[method-assign,assignment]
