"""The methods at scale: LLaMA-style decoders of 4M, 50M, 300M and 1B parameters, bytes and step time against
the estimator and each algorithm's peer.

    python -m benchmarks.scale                   # the sweep (make bench-scale): about 25 minutes on 2 idle CPU cores
    python -m benchmarks.scale --sizes 4M 50M    # a part of it
    python -m benchmarks.scale --report-only     # rewrite the table, JSON and plots from the saved runs

Each size is the built-in decoder (:func:`composer_thaw.models.builtin.tiny_decoder`: the embedded tokenizer's
30,522-token
vocabulary, MLP width twice the hidden size, heads of 64) at a hidden size and depth, trained on batches of 1 x 128
tokens of the same corpus in the same order. A *run* is what :func:`benchmarks.run.run_once` does for the quick
benchmark: a fresh model (built from the same seed), the method's setup from :mod:`benchmarks.methods`, Composer's
Trainer for 4 batches (2 epochs, so LayerFreezing freezes once, at the midpoint), no eval. The rows are
:data:`benchmarks.methods.METHODS` (full fine-tuning, our four algorithms, their peers) in fp32, and full fine-tuning
and our four in bf16 with fp32 masters (the setups of :mod:`benchmarks.master_weights_bench`), and full fine-tuning
in pure bf16. Every size runs its rows in rounds, in an order rotated each round.

Measured per run, after each batch and outside the timed span: the training-state tensors (parameters, gradients,
optimizer state, masters: :class:`benchmarks.measure.StepRecorder`), the optimizer state HiFT holds offloaded, and the
process's resident memory (RSS) growth since before the model was built, from a trimmed heap
(:func:`benchmarks.measure.trim`, so freed activations are not counted); also the peak RSS growth over the run
(activations included). Step time: every batch after the first, from all rounds; median and min-max. The ratio to the
peer pairs each of our steps with the peer's step of the same round and position (ours / peer), median and min-max.

The estimator (``thaw estimate``, :func:`composer_thaw.recipes.memory_estimate.estimate_training_state`) predicts the
bytes
after a step: parameters, gradients and optimizer state (with masters: the fp32 masters and fp32 state, and the
masters' bf16 gradients released by the step). It is compared with the tensors and with the RSS growth at the batch
where the tensors peak (LayerFreezing: after the last batch, half the blocks frozen). On a CPU, HiFT's offloaded
state is host memory in the same process: its RSS is compared with the tensors plus what is offloaded.

Each size runs in a child process that appends every run to ``benchmarks/results/scale-runs/<size>.jsonl`` as it
finishes; a run that kills its process (out of memory) is recorded as failed and the child starts again after it.
At 1B every row runs, those that hold full fine-tuning's state (15 GiB of the 24 in fp32) last (:data:`ROWS_AT`).
Each run records the machine's load average, which the report shows beside the step times: they mean little on a
machine that other work shares.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')

import torch
from composer import Callback, Logger, State

if __package__ in (None, ''):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import StepRecorder, median_spread, rss_bytes, trim
from benchmarks.methods import METHODS, Method, Setup, Task, _decoder_task

RESULTS = Path(__file__).resolve().parent / 'results'
MIB, GIB = 2**20, 2**30
SEQ_LEN = 128
BATCHES = 4  # two epochs of two batches; the first batch is the warm-up
TOLERANCE, SLACK = 0.03, 8 * MIB  # the estimator against the tensors and the RSS growth

# name -> (hidden size, layers, rounds): more rounds where steps are short (and noisier)
SIZES: dict[str, tuple[int, int, int]] = {
    '4M': (64, 4, 5),
    '50M': (512, 8, 3),
    '300M': (1024, 24, 2),
    '1B': (2048, 21, 1),
}
MASTERS, BF16 = 'bf16 + masters', 'bf16'


@dataclass
class ScaleTask(Task):
    """A decoder task whose model is built afresh from the same seed for every run, not copied from a kept one.

    ``base`` is a 4M decoder, kept only for its tokenizer and metrics (PEFT's row rewraps with them); at 1B a kept
    copy would cost 4 GiB of the 24.
    """

    hidden: int = 0
    layers: int = 0

    def fresh_model(self):
        from composer.utils import reproducibility

        from composer_thaw.models.builtin import tiny_decoder

        reproducibility.seed_all(0)
        heads = max(4, self.hidden // 64)
        return tiny_decoder(
            'llama', num_layers=self.layers, hidden_size=self.hidden, num_heads=heads, max_seq_len=SEQ_LEN
        )

    def spec(self):
        """The estimator's :class:`ModelSpec` of :meth:`fresh_model`, from the kept small model's config."""
        from composer_thaw.recipes.memory_estimate import spec_of

        spec = spec_of(self.base)
        config = spec.config
        config.hidden_size, config.intermediate_size = self.hidden, 2 * self.hidden
        config.num_hidden_layers = self.layers
        config.num_attention_heads = config.num_key_value_heads = max(4, self.hidden // 64)
        config.head_dim = self.hidden // config.num_attention_heads  # LlamaConfig derived it from the small size
        return spec


def scale_task(size: str) -> ScaleTask:
    from composer_thaw.recipes.memory_estimate import meta_model

    hidden, layers, _ = SIZES[size]
    small = _decoder_task(size, 64, 4, batch_size=1, seq_len=SEQ_LEN, train_blocks=BATCHES // 2, eval_blocks=1)
    task = ScaleTask(**vars(small), hidden=hidden, layers=layers)
    task.top_patterns = [f'model.layers.{layers - 1}', 'model.norm', 'lm_head']
    task.block_prefixes = [f'model.layers.{i}.' for i in range(layers)]
    params = sum(p.numel() for p in meta_model(task.spec()).parameters())
    task.title = f'LLaMA-style decoder, hidden {hidden}, {layers} layers ({params / 1e6:,.0f}M parameters)'
    return task


# ---- rows: the benchmark's methods, and ours in bf16 with fp32 masters --------------------------------------------


@dataclass(frozen=True)
class Row:
    method: Method
    precision: str = 'fp32'  # 'fp32', 'bf16 + masters' or 'bf16'
    base: str = ''  # the fp32 row's key (ours and full)

    @property
    def key(self) -> str:
        return self.method.key

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32 if self.precision == 'fp32' else torch.bfloat16


def _low_precision(method: Method, precision: str) -> Row:
    """``method`` (full fine-tuning or one of ours) on the model in bf16, with fp32 masters or (full only) without."""
    from benchmarks.master_weights_bench import _algorithms, _FullMasters

    masters = 'fp32' if precision == MASTERS else None

    def setup(task: Task, device: str) -> Setup:
        model = task.fresh_model().to(torch.bfloat16)
        lr = task.adapter_lr if method.key == 'lora_inject' else task.lr
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        callbacks = [_FullMasters()] if method.key == 'full' and masters else []
        return Setup(model, optimizer, _algorithms(task, masters)[method.key], callbacks)

    name, options_of = method.estimate  # type: ignore[misc]
    if masters:
        estimate: tuple[str, Callable[[Task], dict[str, Any]]] = (
            name,
            lambda t: {**options_of(t), 'master_weights': 'fp32'},
        )
    else:
        estimate = (name, options_of)
    suffix = 'masters' if masters else 'bf16'
    label = f'{method.label}, {"bf16 + fp32 masters" if masters else "pure bf16"}'
    return Row(
        replace(method, key=f'{method.key}+{suffix}', label=label, setup=setup, estimate=estimate),
        precision,
        method.key,
    )


class _Bf16Models:
    """``task`` with bf16 models: a peer's own setup, run on the model in bf16."""

    def __init__(self, task: Task) -> None:
        self._task = task

    def __getattr__(self, name: str) -> Any:
        return getattr(self._task, name)

    def fresh_model(self):
        return self._task.fresh_model().to(torch.bfloat16)


def _peer_in_bf16(method: Method) -> Row:
    """A peer on the bf16 model: what our rows with masters compute, so their step compares like with like (PEFT
    keeps its adapters fp32 on a bf16 base, as LoRAInject does; the freezing peers train in pure bf16)."""

    def setup(task: Task, device: str) -> Setup:
        return method.setup(_Bf16Models(task), device)  # type: ignore[arg-type]

    label = f'{method.label}, bf16 model'
    return Row(replace(method, key=f'{method.key}+bf16', label=label, setup=setup), BF16, method.key)


BF16_PEERS = ('composer_lf', 'manual_freeze', 'peft_lora', 'hift_package')


def all_rows() -> list[Row]:
    rows = [Row(m) for m in METHODS]
    for method in METHODS:
        if method.family == 'ours' or method.key == 'full':
            rows.append(_low_precision(method, MASTERS))
    rows.append(_low_precision(METHODS[0], BF16))
    rows += [_peer_in_bf16(m) for m in METHODS if m.key in BF16_PEERS]
    return rows


# What runs at each size, in order: every row. At 1B those that hold full fine-tuning's state (fp32: 15 GiB of
# weights, gradients and AdamW state; with masters, 17 GiB at the step) run last, so that a run the 24 GiB cannot hold
# (recorded as failed) leaves the others measured.
HEAVY_AT_1B = ('composer_lf', 'full', 'layer_freezing', 'full+masters', 'layer_freezing+masters')
ROWS_AT: dict[str, Optional[tuple[str, ...]]] = {
    '1B': tuple(
        [r.key for r in all_rows() if r.key not in HEAVY_AT_1B] + list(HEAVY_AT_1B),
    ),
}

# Rows that start in a process of their own on a CPU (the child exits with FRESH_PROCESS before them; the sweep starts
# the next): after a dozen runs of 1B the heap keeps pages a 17 GiB run cannot reuse, and the kernel killed Composer's
# LayerFreezing (17.5 GiB at its peak) in a process that had run 16 others, where it fits in a fresh one.
FRESH_PROCESS_AT: dict[str, tuple[str, ...]] = {'1B': HEAVY_AT_1B}
FRESH_PROCESS = 75  # a child's exit code: go on in a fresh process

# Rows left out at a size (none today: each was measured at every size on an idle 2-core machine).
LEFT_OUT_AT: dict[str, tuple[str, ...]] = {}


def rows_for(size: str, device: str = 'cpu', only: Optional[list[str]] = None) -> list[Row]:
    """The rows run at ``size`` (``only``: the rows named, even those the size leaves out by default)."""
    keep = ROWS_AT.get(size) if device == 'cpu' else None  # a GPU of 80 GB holds every row
    if only:  # asked for by name: beyond what the size runs by default too
        keep = tuple(only)
    drop = LEFT_OUT_AT.get(size, ()) if device == 'cpu' else ()
    rows = [r for r in all_rows() if r.method.unavailable() is None and r.key not in drop]
    if keep is None:
        return rows
    return sorted((r for r in rows if r.key in keep), key=lambda r: keep.index(r.key))


# ---- one run -------------------------------------------------------------------------------------------------------


def memory_now(on_gpu: bool) -> int:
    """Resident memory from a trimmed heap (CPU), or the bytes CUDA's allocator holds for tensors (GPU)."""
    if on_gpu:
        torch.cuda.synchronize()
        return torch.cuda.memory_allocated()
    trim()
    return rss_bytes()


class AfterStepMemory(Callback):
    """After each batch (after :class:`StepRecorder` took its time and counted the tensors): the memory growth
    (:func:`memory_now`), and the optimizer state and masters HiFT holds offloaded."""

    def __init__(self, recorder: StepRecorder, baseline: int, on_gpu: bool = False) -> None:
        self.recorder = recorder
        self.baseline = baseline
        self.on_gpu = on_gpu
        self.steps: list[dict[str, int]] = []

    def batch_end(self, state: State, logger: Logger) -> None:
        offloaded = 0
        for algorithm in state.algorithms:
            rotation = getattr(algorithm, 'rotation', None)
            if rotation is not None:
                offloaded += rotation.offloaded_bytes()
                masters = getattr(getattr(rotation, 'master_copies', None), 'masters', None)
                parked = getattr(masters, 'offloaded_bytes', None)  # masters parked on the host, where they are
                offloaded += parked() if parked is not None else 0
        self.steps.append(
            {
                'tensors': self.recorder.record.last.total,  # type: ignore[union-attr]
                'offloaded': offloaded,
                'memory_growth': memory_now(self.on_gpu) - self.baseline,
                'outputs': _held_bytes(state.outputs) + _held_bytes(state.batch),
            }
        )


def _held_bytes(value: Any) -> int:
    """Bytes of the tensors in ``value`` (a tensor, a mapping such as a model output, or a sequence of them)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(_held_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_held_bytes(v) for v in value)
    return 0


def measure(task: ScaleTask, row: Row, device: str = 'cpu') -> dict[str, Any]:
    """One run of ``row`` on ``task``: :func:`benchmarks.run.run_once` with the memory measured after each step."""
    from benchmarks.run import run_once

    on_gpu = device == 'gpu'
    trim()
    baseline = memory_now(on_gpu)
    memory: list[AfterStepMemory] = []

    def after_step(recorder: StepRecorder) -> list[Callback]:
        memory.append(AfterStepMemory(recorder, baseline, on_gpu))
        return memory[-1:]

    started = time.perf_counter()
    result = run_once(task, row.method, device, BATCHES, evaluate=False, callbacks=after_step)
    return {
        'step_seconds': result['steady_step_seconds'],
        'step_cpu_seconds': result['steady_step_cpu_seconds'],
        'losses': result['losses'],
        'peak_state': result['peak_state'],
        'last_state': result['last_state'],
        'trainable_params': result['trainable_params'],
        'peak_memory_growth': result['peak_memory_growth'],
        'after_step': memory[0].steps,
        'wall_seconds': time.perf_counter() - started,
    }


def estimate(task: ScaleTask, row: Row) -> Optional[dict[str, Any]]:
    """The estimator's figures for ``row``: the peak and the bytes right after a step (what is measured)."""
    from composer_thaw.recipes.memory_estimate import estimate_training_state

    if row.method.estimate is None:
        return None
    name, options_of = row.method.estimate
    options = dict(options_of(task))
    if name == 'layer_freezing':  # compared after the last batch: the schedule's value at the midpoint epoch end
        options.update(freeze_start=0.0, freeze_level=0.5)
    e = estimate_training_state(task.spec(), name, options, dtype=row.dtype)
    released = e.master_bytes // 2 + e.step_grad_bytes  # with masters: their bf16 grads, gone after the step
    return {
        'options': options,
        'total_params': e.total_params,
        'trainable_params': e.trainable_params,
        'peak': e.training_state_bytes,
        'after_step': e.training_state_bytes - released,
        'split': {
            'params': e.param_bytes,
            'grads': e.grad_bytes - e.master_bytes // 2,
            'optimizer_state': e.optimizer_state_bytes,
            'masters': e.master_bytes,
        },
        'offloaded': e.offloaded_state_bytes,
    }


# ---- a size in a child process, runs saved as they finish ---------------------------------------------------------


def _read_runs(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open('a') as out:
        out.write(json.dumps(record) + '\n')
        out.flush()
        os.fsync(out.fileno())


def run_size(
    size: str,
    path: Path,
    device: str = 'cpu',
    rounds: Optional[int] = None,
    log=print,
    only: Optional[list[str]] = None,
) -> bool:
    """Every round of ``size`` in this process, skipping runs already in ``path``; one that started and never
    finished (its process died) is recorded as failed. Returns ``True`` when it stopped before a row that starts in a
    fresh process (:data:`FRESH_PROCESS_AT`), with runs left to do."""
    import warnings

    warnings.filterwarnings('ignore')
    records = _read_runs(path)
    finished = {(r['row'], r['round']) for r in records if r['event'] in ('done', 'failed')}
    for r in records:
        if r['event'] == 'start' and (r['row'], r['round']) not in finished:
            _append(path, {**r, 'event': 'failed', 'reason': 'its process died (out of memory or an error)'})
            finished.add((r['row'], r['round']))
    rows = rows_for(size, device, only)
    rounds = rounds or SIZES[size][2]
    task = scale_task(size)
    from benchmarks.run import run_once

    smallest = min(SIZES, key=lambda name: SIZES[name][0] * SIZES[name][1])
    run_once(scale_task(smallest), METHODS[0], device, 2, evaluate=False)  # one-time allocations land in no row
    trim()
    started = time.perf_counter()
    fresh = FRESH_PROCESS_AT.get(size, ()) if device == 'cpu' else ()
    ran = False
    for round_index in range(rounds):
        for row in rows[round_index % len(rows) :] + rows[: round_index % len(rows)]:
            if (row.key, round_index) in finished:
                continue
            if ran and row.key in fresh:
                log(f'{size}: {row.key} starts in a fresh process')
                return True
            ran = True
            _append(path, {'event': 'start', 'row': row.key, 'round': round_index, 'size': size})
            result = measure(task, row, device)
            session = os.environ.get('SCALE_SESSION', 'sweep')  # which invocation: its runs ran side by side
            _append(path, {'event': 'done', 'row': row.key, 'round': round_index, 'size': size, 'session': session,
                           'load_average': os.getloadavg()[0], **result})  # fmt: skip
            median = statistics.median(result['step_seconds'])
            log(f'[{time.perf_counter() - started:6.0f}s] {size} round {round_index} {row.key}: step {median:.3f} s')
            trim()
    return False


def sweep(
    sizes: list[str],
    device: str,
    directory: Path,
    rounds: Optional[int] = None,
    log=print,
    only: Optional[list[str]] = None,
) -> None:
    """Each size in a child process, started again after a run that killed it."""
    (directory / 'scale-runs').mkdir(parents=True, exist_ok=True)
    for size in sizes:
        for attempt in range(len(rows_for(size, device, only)) * (rounds or SIZES[size][2]) + 1):
            log(f'{size}: child process, attempt {attempt + 1}')
            command = ['-m', 'benchmarks.scale', '--child', size, '--device', device, '--output-dir', str(directory)]
            command += ['--rounds', str(rounds)] if rounds else []
            command += ['--rows', *only] if only else []
            code = subprocess.call([sys.executable, *command], cwd=Path(__file__).resolve().parents[1])
            if code == 0:
                break
            if code == FRESH_PROCESS:
                continue
            log(f'{size}: child exited with {code}; the run it was in is recorded as failed')


# ---- aggregation, table, plots ----------------------------------------------------------------------------------


def _ratios(ours: dict[int, list[float]], peer: dict[int, list[float]], sessions=None) -> Optional[dict[str, float]]:
    """Each of our steps over the peer's step of the same round and batch (and the same invocation, when
    ``sessions`` gives each side's: runs added later ran on a machine in another state): median and min-max."""
    rounds = sorted(set(ours) & set(peer))
    if sessions is not None:
        rounds = [k for k in rounds if sessions[0].get(k) == sessions[1].get(k)]
    pairs = [a / b for k in rounds for a, b in zip(ours[k], peer[k])]
    return median_spread(pairs) if pairs else None


def aggregate(size: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One size's rows from its saved runs, with the estimator's figures for each (computed here, on ``meta``)."""
    by_row: dict[str, dict[str, Any]] = {}
    rows = {r.key: r for r in all_rows()}
    task = scale_task(size)
    for rec in records:
        entry = by_row.setdefault(rec['row'], {'runs': {}, 'failed': []})
        if 'estimate' not in entry:
            entry['estimate'] = estimate(task, rows[rec['row']])
        if rec['event'] == 'done':
            entry['runs'][rec['round']] = rec
        elif rec['event'] == 'failed':
            entry['failed'].append(rec['reason'])
    out = []
    for key, entry in by_row.items():
        row = rows[key]
        runs = [entry['runs'][k] for k in sorted(entry['runs'])]
        item: dict[str, Any] = {
            'row': key,
            'label': row.method.label,
            'family': row.method.family,
            'precision': row.precision,
            'closest_peer': row.method.closest_peer,
            'base': row.base,
            'estimate': entry.get('estimate'),
            'failed': entry['failed'],
            'rounds': len(runs),
        }
        if runs:
            first = runs[0]
            at = len(first['after_step']) - 1 if row.method.key.startswith('layer_freezing') else None
            if at is None:
                at = max(range(len(first['after_step'])), key=lambda i: first['after_step'][i]['tensors'])
            point = first['after_step'][at]
            cpu = {r['round']: r['step_cpu_seconds'] for r in runs if 'step_cpu_seconds' in r}
            if cpu:  # runs before CPU time was recorded have none
                item['step_cpu_seconds'] = median_spread([s for steps in cpu.values() for s in steps])
                item['step_cpu_times'] = cpu
            item.update(
                trainable_params=first['trainable_params'],
                step_seconds=median_spread([s for r in runs for s in r['step_seconds']]),
                step_times={r['round']: r['step_seconds'] for r in runs},
                sessions={r['round']: r.get('session', 'sweep') for r in runs},
                compared_at_batch=at + 1,
                tensors=point['tensors'],
                offloaded=point['offloaded'],
                memory_growth=median_spread([r['after_step'][at]['memory_growth'] for r in runs]),
                peak_memory_growth=median_spread([r['peak_memory_growth'] for r in runs]),
                state_split=first['last_state'] if at == len(first['after_step']) - 1 else None,
                losses=first['losses'],
            )
            held = point.get('outputs')
            if held is None:  # runs saved before the outputs were counted: the logits, batch x seq x vocab
                held = SEQ_LEN * task.spec().config.vocab_size * (4 if row.precision == 'fp32' else 2)
            item['outputs'] = held
            beyond = item['memory_growth']['median'] - held  # what the training state should explain
            prediction = (entry.get('estimate') or {}).get('after_step')
            if prediction:
                item['tensors_error'] = point['tensors'] / prediction - 1
                if not row.method.key.startswith('hift_rotation'):
                    item['memory_error'] = beyond / prediction - 1
            item['memory_vs_tensors'] = beyond / (point['tensors'] + point['offloaded']) - 1
        out.append(item)
    measured = {i['row']: i for i in out if i.get('step_times')}
    for item in measured.values():
        peer = measured.get(item['closest_peer'] or '')
        if item['precision'] != 'fp32' and f'{item["closest_peer"]}+bf16' in measured:  # like with like
            peer = measured[f'{item["closest_peer"]}+bf16']
        if peer is not None:
            item['peer_row'] = peer['row']
            sessions = (item['sessions'], peer['sessions'])
            item['vs_peer'] = _ratios(item['step_times'], peer['step_times'], sessions)
            if 'step_cpu_times' in item and 'step_cpu_times' in peer:
                item['vs_peer_cpu'] = _ratios(item['step_cpu_times'], peer['step_cpu_times'], sessions)
        base = measured.get(item['base'])
        if base is not None and item['precision'] != 'fp32':
            item['vs_fp32'] = _ratios(item['step_times'], base['step_times'], (item['sessions'], base['sessions']))
    hidden, layers, _ = SIZES[size]
    params = next((i['estimate']['total_params'] for i in out if i.get('estimate')), None)
    loads = [r['load_average'] for r in records if r['event'] == 'done' and 'load_average' in r]
    load = median_spread(loads) if loads else None
    return {'size': size, 'hidden': hidden, 'layers': layers, 'params': params, 'rows': out, 'load_average': load}


def _within(error: Optional[float], prediction: int) -> bool:
    return error is not None and abs(error) * prediction <= TOLERANCE * prediction + SLACK


def _mib(n: Optional[int]) -> str:
    return f'{n / MIB:,.0f}' if n else ''


def _cell_ratio(stats: Optional[dict[str, float]]) -> str:
    if not stats:
        return ''
    return f'{stats["median"]:.2f}x ({stats["min"]:.2f}-{stats["max"]:.2f})'


def size_table(size: dict[str, Any], memory: str = 'RSS') -> str:
    load = size.get('load_average')
    machine = (
        f'; 1-minute load average after each run {load["median"]:.1f} ({load["min"]:.1f}-{load["max"]:.1f}), its '
        'own 2 threads included'
        if load
        else ''
    )
    lines = [
        f'**{size["size"]}: hidden {size["hidden"]}, {size["layers"]} layers, {size["params"]:,} parameters**, '
        f'batch 1 x {SEQ_LEN} tokens, {BATCHES} batches per run{machine}:',
        '',
        '| method | precision | trainable | step s, median (min-max) | step vs peer | vs own fp32 | CPU s per step '
        '| CPU vs peer | tensors MiB '
        f'| {memory} growth MiB | estimate MiB | tensors vs est. | {memory} vs est. | peak {memory} growth MiB '
        '| est. peak MiB |',
        '|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    for item in size['rows']:
        if 'step_seconds' not in item:
            why = '; '.join(sorted(set(item['failed']))) or 'not run'
            lines.append(f'| {item["label"]} | {item["precision"]} | failed: {why} |' + ' |' * 12)
            continue
        est = item.get('estimate')
        prediction = est['after_step'] if est else None
        s = item['step_seconds']
        peer = f' (peer: {item["peer_row"]})' if item.get('vs_peer') else ''
        tensors_cell = f'{item["tensors"] / MIB:,.0f}'
        if item['offloaded']:
            tensors_cell += f' + {item["offloaded"] / MIB:,.0f} offloaded'
        cpu = f'{item["step_cpu_seconds"]["median"]:.3f}' if 'step_cpu_seconds' in item else ''
        errors = []
        for key in ('tensors_error', 'memory_error'):
            error = item.get(key)
            if error is None or prediction is None:
                errors.append('')
            else:
                errors.append(f'{error:+.2%}{"" if _within(error, prediction) else " (out)"}')
        if prediction is not None and item.get('memory_error') is None:
            errors[1] = f'vs tensors + offloaded: {item["memory_vs_tensors"]:+.2%}'
        lines.append(
            f'| {item["label"]}{peer} | {item["precision"]} | {item["trainable_params"]:,} | '
            f'{s["median"]:.3f} ({s["min"]:.3f}-{s["max"]:.3f}) | {_cell_ratio(item.get("vs_peer"))} | '
            f'{_cell_ratio(item.get("vs_fp32"))} | {cpu} | {_cell_ratio(item.get("vs_peer_cpu"))} | '
            f'{tensors_cell} | {item["memory_growth"]["median"] / MIB:,.0f} | '
            f'{_mib(prediction)} | {errors[0]} | {errors[1]} | '
            f'{item["peak_memory_growth"]["median"] / MIB:,.0f} | {_mib(est and est["peak"])} |'
        )
    return '\n'.join(lines)


def markdown(result: dict[str, Any]) -> str:
    env = result['environment']
    where = (
        f'GPU {env["gpu"]}'
        if env['device'] == 'gpu'
        else f'CPU ({env["cpu"]}, {env["cpu_count"]} cores, {env["torch_threads"]} torch threads)'
    )
    parts = [
        f'Measured {env["date"]} on {where}; Composer Trainer, AdamW, batch 1 x {SEQ_LEN} tokens, '
        f'{BATCHES} batches per run (the first one a warm-up), rounds per size in rotated order.',
        '',
        "Step s: wall time of every batch after the first, of every round; CPU s: this process's CPU time (both "
        'threads) over the same span, where the run recorded it (less sensitive to other work on the machine). '
        "Step vs peer: ours / its peer's step at the same round "
        'and batch, median (min-max) (LayerFreezing: Composer LayerFreezing; RegexFreeze: requires_grad by hand; '
        'LoRAInject: PEFT; HiFTRotation: the hift package; the masters rows against the same peer on the bf16 model '
        'where it ran, else the fp32 one); only runs of the same invocation pair (rows added later ran on a machine '
        'under other load). vs own fp32: the same pairing against our fp32 row. '
        'Tensors: parameters, gradients, optimizer state and masters counted '
        'from the tensors after the batch where they peak (LayerFreezing: after the last batch, half its blocks '
        "frozen); HiFT's offloaded state apart. RSS growth (on a GPU: CUDA allocated): resident "
        'memory after that batch, trimmed heap, since before the model was built (median over rounds); it is '
        "compared less the last batch's outputs Composer keeps until the next batch (`state.outputs`: the logits, "
        f'1 x {SEQ_LEN} x 30,522, 15 MiB in fp32), which are no training state. '
        'Estimate: `thaw estimate` for the same point '
        f'(activations excluded); "(out)": outside {TOLERANCE:.0%} + {SLACK // MIB} MiB. Peak RSS growth includes '
        "activations and the step's transient copies; est. peak: the estimator's peak (with masters: the bf16 "
        'gradients and their fp32 copies during the step), activations excluded.',
    ]
    missing = result.get('missing')
    if missing:
        parts += ['', f'Not measured: {missing}']
    parts += [
        '',
        "Each of ours against its peer, step by step (ours / peer's, median and min-max):",
        '',
        ratio_table(result),
    ]
    for size in result['sizes']:
        parts += ['', size_table(size, 'RSS' if env['device'] == 'cpu' else 'CUDA allocated')]
        left_out = [r.key for r in all_rows() if r.key not in {i['row'] for i in size['rows']}]
        if left_out and (size['size'] in ROWS_AT or size['size'] in LEFT_OUT_AT) and env['device'] == 'cpu':
            parts += [
                '',
                f'Left out at {size["size"]} (24 GiB of RAM, the 45-minute budget): {", ".join(left_out)}.',
            ]
    parts += ['', f'Total time {result["seconds"] / 60:.0f} min.']
    return '\n'.join(parts)


# Lines of the plots: one colour per algorithm and its peers, solid for ours, dashed and dotted for the peers; the
# marker says the precision.
PLOT_GROUPS: dict[str, tuple[str, str]] = {
    'full': ('black', '-'),
    'layer_freezing': ('tab:blue', '-'),
    'composer_lf': ('tab:blue', '--'),
    'regex_freeze': ('tab:orange', '-'),
    'manual_freeze': ('tab:orange', '--'),
    'lora_inject': ('tab:green', '-'),
    'peft_lora': ('tab:green', '--'),
    'loralib': ('tab:green', ':'),
    'hift_rotation': ('tab:red', '-'),
    'hift_package': ('tab:red', '--'),
    'badam': ('tab:red', ':'),
}
PLOT_MARKERS = {'fp32': 'o', MASTERS: 's', BF16: '^'}


def plot(result: dict[str, Any], directory: Path) -> list[Path]:
    """Log-log: training-state bytes and step time against parameters, one line per row (:data:`PLOT_GROUPS`)."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    paths = []
    for name, value, ylabel in (
        ('scale_bytes.png', lambda i: i['tensors'] + i['offloaded'], 'training-state bytes after a step (GiB)'),
        ('scale_step_time.png', lambda i: i['step_seconds']['median'], 'step time, median (s)'),
    ):
        fig, ax = plt.subplots(figsize=(10, 7))
        lines: dict[str, list[tuple[float, float]]] = {}
        items: dict[str, dict[str, Any]] = {}
        for size in result['sizes']:
            for item in size['rows']:
                if 'step_seconds' in item and size['params']:
                    y = value(item) / (GIB if name == 'scale_bytes.png' else 1)
                    lines.setdefault(item['row'], []).append((size['params'], y))
                    items[item['row']] = item
        for key, points in lines.items():
            xs, ys = zip(*sorted(points))
            item = items[key]
            colour, style = PLOT_GROUPS.get(key.split('+')[0], ('grey', '-.'))
            label = item['label'].replace('ours: ', '*')
            ax.plot(xs, ys, style, color=colour, marker=PLOT_MARKERS.get(item['precision'], 'o'), markersize=4,
                    linewidth=1.2, label=label)  # fmt: skip
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('parameters')
        ax.set_ylabel(ylabel)
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=7, loc='upper left', ncol=2)
        what = 'Bytes' if name == 'scale_bytes.png' else 'Step time'
        ax.set_title(f'{what} against model size (* = ours; o fp32, s bf16 + fp32 masters, ^ pure bf16)')
        fig.tight_layout()
        fig.savefig(directory / name, dpi=90)
        plt.close(fig)
        paths.append(directory / name)
    return paths


README_START, README_END = '<!-- scale:start -->', '<!-- scale:end -->'


def ratio_table(result: dict[str, Any]) -> str:
    """Each of our rows' step against its peer's at every size, one column a size: median (min-max) of the paired
    steps."""
    sizes = result['sizes']
    ours: dict[str, dict[str, Any]] = {}
    for size in sizes:
        for item in size['rows']:
            if item['family'] == 'ours':
                ours.setdefault(item['row'], {})[size['size']] = item
    lines = [
        '| ours | peer | ' + ' | '.join(size['size'] for size in sizes) + ' |',
        '|---|---|' + '---|' * len(sizes),
    ]
    for at in ours.values():
        first = next(iter(at.values()))
        peers = sorted({item['peer_row'] for item in at.values() if item.get('peer_row')})
        cells = [_cell_ratio(at[size['size']].get('vs_peer')) if size['size'] in at else '' for size in sizes]
        label = first['label'].replace('ours: ', '')
        lines.append(f'| {label} | {", ".join(peers)} | ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


def summary(result: dict[str, Any], sizes: tuple[str, ...] = ('300M', '1B')) -> str:
    """The README's table: at the large sizes, each row the estimator predicts, its bytes measured two ways beside
    the prediction, and each of ours' step against its peer."""
    memory = 'RSS' if result['environment']['device'] == 'cpu' else 'CUDA allocated'
    lines = [
        f'| size | method | precision | tensors GiB | {memory} growth GiB | estimate GiB | tensors vs est. '
        f'| {memory} vs est. | step vs peer, median (min-max) | CPU time vs peer |',
        '|---|---|---|---|---|---|---|---|---|---|',
    ]
    for size in result['sizes']:
        if size['size'] not in sizes:
            continue
        for item in size['rows']:
            est = item.get('estimate')
            if est is None or 'step_seconds' not in item:
                if est is not None:
                    lines.append(f'| {size["size"]} | {item["label"]} | {item["precision"]} | failed |' + ' |' * 6)
                continue
            error = item.get('memory_error')
            memory_cell = f'{error:+.2%}' if error is not None else f'{item["memory_vs_tensors"]:+.2%} (vs tensors)'
            tensors = item['tensors'] / GIB
            lines.append(
                f'| {size["size"]} | {item["label"].replace("ours: ", "")} | {item["precision"]} | {tensors:.2f} | '
                f'{item["memory_growth"]["median"] / GIB:.2f} | {est["after_step"] / GIB:.2f} | '
                f'{item["tensors_error"]:+.2%} | {memory_cell} | {_cell_ratio(item.get("vs_peer"))} | '
                f'{_cell_ratio(item.get("vs_peer_cpu"))} |'
            )
    return '\n'.join(lines)


def write(
    sizes: list[str], seconds: float, directory: Path = RESULTS, device: str = 'cpu', update_readme: bool = False
) -> dict[str, Any]:
    from benchmarks.report import README
    from benchmarks.run import environment
    from composer_thaw.utils.atomic_files import atomic_write_text

    aggregated, missing = [], []
    for size in sizes:
        records = _read_runs(directory / 'scale-runs' / f'{size}.jsonl')
        if not any(r['event'] == 'done' for r in records):
            missing.append(f'{size} (no run finished)')
            continue
        item = aggregate(size, records)
        rounds = SIZES[size][2]
        short = [i['row'] for i in item['rows'] if i.get('rounds', 0) < rounds and not i['failed']]
        if short:
            missing.append(f'{size}: {", ".join(short)} ran fewer than {rounds} rounds')
        aggregated.append(item)
    result = {
        'environment': environment(device),
        'seq_len': SEQ_LEN,
        'batches': BATCHES,
        'tolerance': TOLERANCE,
        'slack_bytes': SLACK,
        'sizes': aggregated,
        'missing': '; '.join(missing),
        'seconds': seconds,
    }
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_text(directory / 'scale.json', json.dumps(result, indent=1) + '\n')
    table = markdown(result)
    atomic_write_text(directory / 'scale.md', table + '\n')
    plot(result, directory)
    if update_readme:
        text = README.read_text()
        head, rest = text.split(README_START, 1)
        _, tail = rest.split(README_END, 1)
        images = '![bytes against size](benchmarks/results/scale_bytes.png)\n'
        images += '![step time against size](benchmarks/results/scale_step_time.png)'
        body = f'{ratio_table(result)}\n\n{summary(result)}\n\n{images}'
        atomic_write_text(README, f'{head}{README_START}\n{body}\n{README_END}{tail}')
    return result


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--sizes', nargs='*', default=list(SIZES), choices=list(SIZES))
    parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
    parser.add_argument('--report-only', action='store_true', help='rewrite the reports from the saved runs')
    parser.add_argument('--fresh', action='store_true', help='forget the saved runs of these sizes first')
    parser.add_argument('--retry-failed', action='store_true', help='run again the runs of these sizes that failed')
    parser.add_argument('--update-readme', action='store_true')
    parser.add_argument('--device', choices=['cpu', 'gpu'], default='cpu')
    parser.add_argument('--rounds', type=int, default=None, help="rounds per size (default: SIZES' own)")
    parser.add_argument('--rows', nargs='*', default=None, help='only these rows (keys), e.g. to add a round to them')
    parser.add_argument('--output-dir', type=Path, default=RESULTS, help='reports here, runs in its scale-runs/')
    args = parser.parse_args(argv)
    runs = args.output_dir / 'scale-runs'
    if args.child:
        torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', torch.get_num_threads())))
        log = lambda m: print(m, flush=True)  # noqa: E731
        path = runs / f'{args.child}.jsonl'
        if run_size(args.child, path, args.device, args.rounds, log=log, only=args.rows):
            sys.exit(FRESH_PROCESS)
        return
    started = time.perf_counter()
    os.environ.setdefault('SCALE_SESSION', time.strftime('%Y-%m-%d %H:%M:%S'))
    if not args.report_only:
        for size in args.sizes:
            path = runs / f'{size}.jsonl'
            if args.fresh:
                path.unlink(missing_ok=True)
            elif args.retry_failed and path.exists():
                records = _read_runs(path)
                failed = {
                    (r['row'], r['round'])
                    for r in records
                    if r['event'] == 'failed' and (not args.rows or r['row'] in args.rows)
                }
                kept = [r for r in records if (r['row'], r.get('round')) not in failed or r['event'] == 'done']
                path.write_text(''.join(json.dumps(r) + '\n' for r in kept))
        sweep(args.sizes, args.device, args.output_dir, args.rounds, lambda m: print(m, flush=True), args.rows)
    seconds = time.perf_counter() - started
    if args.report_only:  # the runs' own time
        done = [r for s in args.sizes for r in _read_runs(runs / f'{s}.jsonl') if r['event'] == 'done']
        seconds = sum(r['wall_seconds'] for r in done)
    result = write(args.sizes, seconds, args.output_dir, args.device, args.update_readme)
    print(markdown(result))


if __name__ == '__main__':
    main()
