"""How the benchmarks measure: step time over interleaved repeats, training-state bytes, process memory.

* Time: :func:`time_call` (synchronizes CUDA around the call), :func:`interleaved_times` (warm-up, then every
  function once per round, so load from other processes hits all of them alike), :func:`median_spread`.
* Bytes: :func:`composer_thaw.utils.optimizer_surgery.training_state_bytes` on the model and optimizer, per batch, by
  :class:`StepRecorder` (peak and last value), which also records each batch's wall time and loss.
* Process memory on CPU: resident set size (RSS) from ``/proc``. :func:`quiet_allocator` makes it trustworthy:
  glibc's mmap threshold is pinned (large tensors are mmapped and returned to the system when freed, instead of
  staying in the heap after the threshold adapts), and :func:`trim` releases freed heap pages. The peak is reset
  between runs through ``/proc/self/clear_refs``, so each run reports its own peak. On a GPU the same fields come
  from ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from composer import Callback, Logger, State
from torch import nn

from composer_thaw.utils.optimizer_surgery import TrainingStateBytes, training_state_bytes

__all__ = [
    'MemoryProbe',
    'StepRecorder',
    'adamw',
    'interleaved_times',
    'median_spread',
    'peak_rss_bytes',
    'quiet_allocator',
    'reset_peak_rss',
    'rss_bytes',
    'time_call',
    'train_step',
    'trim',
]

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_MMAP_THRESHOLD_BYTES = 128 * 1024
_libc: Optional[ctypes.CDLL] = None


def _glibc() -> Optional[ctypes.CDLL]:
    global _libc
    if _libc is None:
        name = ctypes.util.find_library('c')
        try:
            _libc = ctypes.CDLL(name or 'libc.so.6')
            _libc.malloc_trim  # noqa: B018 (glibc only)
        except (OSError, AttributeError):
            return None
    return _libc


def quiet_allocator() -> bool:
    """Pin glibc's mmap threshold at 128 KiB, so freed tensors go back to the system. False if not glibc."""
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_BYTES))


def trim() -> None:
    """Collect garbage and return free heap pages to the system (glibc ``malloc_trim``)."""
    gc.collect()
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _status_kib(key: str) -> int:
    with open('/proc/self/status') as status:
        for line in status:
            if line.startswith(key + ':'):
                return int(line.split()[1])
    raise KeyError(key)


def peak_rss_bytes() -> int:
    """Peak resident set size since the process started or since :func:`reset_peak_rss`."""
    return _status_kib('VmHWM') * 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not allowed."""
    try:
        with open('/proc/self/clear_refs', 'w') as clear_refs:
            clear_refs.write('5')
        return True
    except OSError:
        return False


@dataclass
class MemoryProbe:
    """Peak memory of a span of work: process RSS growth on CPU, ``max_memory_allocated`` on CUDA."""

    on_gpu: bool = False
    baseline: int = 0
    peak: int = 0
    peak_growth: int = 0

    def __enter__(self) -> MemoryProbe:
        trim()
        if self.on_gpu:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
        else:
            reset_peak_rss()
            self.baseline = rss_bytes()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
        else:
            self.peak = peak_rss_bytes()
        self.peak_growth = self.peak - self.baseline


def time_call(fn: Callable[[], Any], device: str = 'cpu') -> float:
    """Wall seconds of ``fn()``; CUDA work is synchronized before and after."""
    if device in ('cuda', 'gpu'):
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device in ('cuda', 'gpu'):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved_times(
    fns: dict[str, Callable[[], Any]], rounds: int, device: str = 'cpu', warmup: int = 1
) -> dict[str, list[float]]:
    """Call each function ``warmup`` times, then once per round in turn; return each one's times."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_call(fn, device))
    return times


def median_spread(values: Sequence[float]) -> dict[str, float]:
    """Median, minimum and maximum of ``values`` (the spread reported next to each median)."""
    values = list(values)
    if not values:
        return {'median': float('nan'), 'min': float('nan'), 'max': float('nan'), 'n': 0}
    return {'median': statistics.median(values), 'min': min(values), 'max': max(values), 'n': len(values)}


def adamw(model: nn.Module, lr: float = 1e-4, weight_decay: float = 0.1) -> torch.optim.Optimizer:
    """AdamW over the parameters that require grad."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor, set_to_none: bool = True) -> None:
    """One causal-LM step on a Hugging Face model: zero grads, forward with ``labels=ids``, backward, step."""
    optimizer.zero_grad(set_to_none=set_to_none)
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    optimizer.step()


StateCounter = Callable[[State], TrainingStateBytes]


def default_state_counter(state: State) -> TrainingStateBytes:
    return training_state_bytes(state.model, state.optimizers)


@dataclass
class StepRecord:
    """What :class:`StepRecorder` saw during one ``fit``."""

    step_seconds: list[float] = field(default_factory=list)
    step_cpu_seconds: list[float] = field(default_factory=list)  # this process's CPU time (all threads) per batch
    losses: list[float] = field(default_factory=list)
    peak: Optional[TrainingStateBytes] = None
    last: Optional[TrainingStateBytes] = None
    trainable_params: int = 0  # the most that trained in any batch
    samples: int = 0


class StepRecorder(Callback):
    """Per batch: wall time (BATCH_START to BATCH_END, CUDA synchronized), loss, training-state bytes."""

    def __init__(self, count_state: StateCounter = default_state_counter, on_gpu: bool = False) -> None:
        self.count_state = count_state
        self.on_gpu = on_gpu
        self.record = StepRecord()
        self._started = self._cpu_started = 0.0

    def batch_start(self, state: State, logger: Logger) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()
        self._started = time.perf_counter()
        self._cpu_started = time.process_time()

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.on_gpu:
            torch.cuda.synchronize()
        record = self.record
        record.step_seconds.append(time.perf_counter() - self._started)
        record.step_cpu_seconds.append(time.process_time() - self._cpu_started)
        loss = state.loss
        record.losses.append(float(sum(loss) if isinstance(loss, (list, tuple)) else loss))
        counts = self.count_state(state)
        record.last = counts
        if record.peak is None or counts.total > record.peak.total:
            record.peak = counts
        trainable = sum(p.numel() for p in state.model.parameters() if p.requires_grad)
        record.trainable_params = max(record.trainable_params, trainable)
        record.samples = int(state.timestamp.sample)
