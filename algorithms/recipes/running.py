"""Turn a validated :class:`~composer_thaw.recipes.schema.Recipe` into a Composer ``Trainer``, run it, and summarize it.

Example:
    >>> from composer_thaw.recipes.schema import load_recipe
    >>> recipe = load_recipe('yamls/lora_decoder.yaml', overrides=[  # shrunk to a run of seconds
    ...     'model.hidden_size=16', 'data.max_seq_len=16', 'global_train_batch_size=4', 'max_duration=2ba',
    ...     'data.max_eval_samples=4', 'progress_bar=false'])
    >>> summary = run_recipe(recipe)
    >>> print(format_summary(summary))
    | metric ...
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
from composer import Callback, Logger, State, Trainer
from composer.utils import dist, reproducibility
from torch import nn

from composer_thaw.callbacks.interruption import checkpoint_on_interrupt
from composer_thaw.callbacks.loss_guard import StopOnNonFiniteLoss
from composer_thaw.core.registry import build_algorithm
from composer_thaw.core.state import ConfigRepr
from composer_thaw.core.validation import ConfigError
from composer_thaw.recipes.building import (
    RecipeData,
    build_loggers,
    build_optimizer,
    build_parallelism,
    build_recipe_model,
    build_scheduler,
)
from composer_thaw.recipes.run_files import complete_latest_link, resume_from_a_complete_checkpoint
from composer_thaw.recipes.schema import (
    Recipe,
    check_processes,
)
from composer_thaw.utils.atomic_checkpoints import checkpoint_saver
from composer_thaw.utils.atomic_files import atomic_write_text
from composer_thaw.utils.node_signal_files import per_node_signal_files
from composer_thaw.utils.optimizer_surgery import training_state_bytes
from composer_thaw.utils.parameter_selection import user_module
from composer_thaw.utils.sharding import full_tensor
from composer_thaw.utils.trainable_checkpoints import FrozenWeightsMismatch

__all__ = ['RunSummary', 'TrainingSummary', 'build_trainer', 'format_summary', 'parameter_checksum', 'run_recipe']


def parameter_checksum(model: nn.Module) -> str:
    """SHA-256 over every parameter's bytes in name order: equal checksums mean bit-identical parameters."""
    digest = hashlib.sha256()
    for name, param in sorted(user_module(model).named_parameters()):
        digest.update(name.encode())
        whole = full_tensor(param.detach())  # gathered from every rank under FSDP2: call it on every rank
        digest.update(whole.cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass
class RunSummary:
    """What a run cost and achieved. Bytes are those of the training batch with the most training state (its
    parameters + gradients + optimizer state + fp32 masters), on this process; samples/s counts every process's
    samples."""

    total_params: int = 0
    trainable_params: int = 0
    param_bytes: int = 0
    grad_bytes: int = 0
    optimizer_state_bytes: int = 0
    master_bytes: int = 0  # fp32 master copies (master_weights: fp32)
    peak_memory_bytes: int = 0
    samples_per_second: float = 0.0
    train_batches: int = 0
    batches_run: int = 0  # in this process: fewer than train_batches when resumed from a checkpoint
    resumed_from: Optional[str] = None  # the checkpoint a resumed run started from (load_path or autoresume)
    resumed_at_batch: int = 0  # the batch it had trained up to
    eval_metrics: dict[str, float] = field(default_factory=dict)
    majority_rate: Optional[float] = None
    world_size: int = 1
    algorithms: list[str] = field(default_factory=list)
    param_checksums: list[str] = field(default_factory=list)

    @property
    def training_state_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_state_bytes + self.master_bytes


def _peak_memory_bytes(on_gpu: bool) -> int:
    if on_gpu:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class TrainingSummary(Callback):
    """Records training-state bytes (peak over batches), trainable parameters and training throughput."""

    def __init__(self) -> None:
        self.summary = RunSummary()
        self._batch_started = 0.0
        self._train_seconds = 0.0
        self._samples = 0
        self._first_sample: Optional[int] = None
        self.last_eval_batch: Optional[int] = None

    def batch_start(self, state: State, logger: Logger) -> None:
        self._batch_started = time.perf_counter()
        if self._first_sample is None:  # a resumed run starts past zero
            self._first_sample = int(state.timestamp.sample)

    def batch_end(self, state: State, logger: Logger) -> None:
        self._train_seconds += time.perf_counter() - self._batch_started
        model = state.model
        counts = training_state_bytes(model, state.optimizers)
        s = self.summary
        if counts.total >= s.training_state_bytes:  # the split of the peak batch, so the parts add up to it
            s.param_bytes, s.grad_bytes, s.optimizer_state_bytes = counts.params, counts.grads, counts.optimizer_state
            s.master_bytes = counts.masters
        s.total_params = sum(p.numel() for p in model.parameters())
        s.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        s.train_batches = int(state.timestamp.batch)
        s.batches_run += 1
        self._samples = int(state.timestamp.sample) - (self._first_sample or 0)

    def eval_end(self, state: State, logger: Logger) -> None:
        self.last_eval_batch = int(state.timestamp.batch)

    def fit_end(self, state: State, logger: Logger) -> None:
        s = self.summary
        s.samples_per_second = self._samples / self._train_seconds if self._train_seconds else 0.0
        s.peak_memory_bytes = _peak_memory_bytes(state.device.name == 'gpu')


def build_trainer(recipe: Recipe) -> tuple[Trainer, TrainingSummary, RecipeData]:
    """Build model, data, optimizer, algorithms and the Trainer for ``recipe`` (already validated).

    What only the model reveals (a checkpoint folder transformers cannot read, a sequence longer than the model's
    positions, an algorithm option that fits no part of the model, nothing left to train) raises
    :class:`ConfigError` before any training step, leaving no save folder behind.
    """
    with _no_new_folder_on_error(recipe.save_folder):
        return _build_trainer(recipe)


@contextmanager
def _no_new_folder_on_error(folder: Optional[str]) -> Iterator[None]:
    """Remove ``folder`` again if it did not exist before and is still empty when a ConfigError leaves."""
    created = None if folder is None or Path(folder).exists() else Path(folder)
    try:
        yield
    except ConfigError:
        if created is not None and created.is_dir() and not any(created.iterdir()):
            created.rmdir()
        raise


def _build_trainer(recipe: Recipe) -> tuple[Trainer, TrainingSummary, RecipeData]:
    world_size = dist.get_world_size()
    check_processes(recipe, world_size, str(world_size))
    if recipe.autoresume and recipe.save_folder is not None:
        fallback = resume_from_a_complete_checkpoint(recipe.save_folder, dist.get_global_rank())
        if fallback is not None:
            warnings.warn(f'autoresume: {fallback}.', UserWarning, stacklevel=2)
    if recipe.load_path is not None and dist.get_global_rank() == 0:
        fallback = complete_latest_link(recipe.load_path)
        if fallback is not None:
            warnings.warn(f'load_path: {fallback}.', UserWarning, stacklevel=2)
    algorithms = [build_algorithm(name, kwargs) for name, kwargs in recipe.algorithms.items()]
    reproducibility.seed_all(recipe.seed)
    built = build_recipe_model(recipe, recipe.global_train_batch_size // world_size)
    model, data = built.model, built.data
    optimizer = build_optimizer(model, recipe.optimizer)
    summary = TrainingSummary()
    # Algorithms check themselves against the model at INIT and BEFORE_LOAD; a checkpoint loads while it is built.
    # per_node_signal_files: several nodes can autoresume from one shared save folder (a Composer 0.32 fix)
    with _algorithm_errors(recipe, algorithms), _checkpoint_errors(recipe), per_node_signal_files():
        trainer = _trainer(recipe, model, data, optimizer, algorithms, summary)
    if not any(param.requires_grad for param in model.parameters()):
        trainer.close()
        raise ConfigError(
            'algorithms',
            dict(recipe.algorithms),
            'together they leave no parameter to train (every one is frozen), so the first backward pass would fail; '
            'name something to train.',
        )
    summary.summary.majority_rate = data.majority_rate
    summary.summary.algorithms = [repr(a) if isinstance(a, ConfigRepr) else type(a).__name__ for a in algorithms]
    return trainer, summary, data


def _trainer(recipe: Recipe, model, data: RecipeData, optimizer, algorithms: list, summary: TrainingSummary) -> Trainer:
    return Trainer(
        model=model,
        train_dataloader=data.train_dataloader,
        eval_dataloader=data.eval_dataloader,
        eval_interval=recipe.eval_interval,
        max_duration=recipe.max_duration,
        optimizers=optimizer,
        schedulers=build_scheduler(recipe.scheduler),
        algorithms=algorithms,
        callbacks=[summary, StopOnNonFiniteLoss()]
        if recipe.save_folder is None
        else [summary, StopOnNonFiniteLoss(), checkpoint_saver(recipe.save_folder, recipe.save_interval)],
        loggers=build_loggers(recipe.loggers),
        device=recipe.device,
        precision=recipe.precision,
        device_train_microbatch_size=recipe.device_train_microbatch_size,
        seed=recipe.seed,
        run_name=recipe.run_name,
        progress_bar=recipe.progress_bar,
        log_to_console=False,
        save_folder=recipe.save_folder,
        save_interval=recipe.save_interval,
        save_overwrite=True,
        load_path=recipe.load_path,
        load_weights_only=recipe.load_weights_only,
        autoresume=recipe.autoresume,
        parallelism_config=build_parallelism(recipe.parallelism),
        python_log_level=None,
    )


@contextmanager
def _algorithm_errors(recipe: Recipe, algorithms: list) -> Iterator[None]:
    """An algorithm that refuses the model while the Trainer is built (before any training step) becomes an error
    naming its recipe key; the algorithm is found among the frames that raised."""
    names = {id(algorithm): name for name, algorithm in zip(recipe.algorithms, algorithms)}
    try:
        yield
    except (ValueError, NotImplementedError) as error:
        if isinstance(error, ConfigError):
            raise
        for frame, _ in traceback.walk_tb(error.__traceback__):
            name = names.get(id(frame.f_locals.get('self')))
            if name is not None:
                raise ConfigError(f'algorithms.{name}', recipe.algorithms[name] or {}, str(error)) from error
        raise


@contextmanager
def _checkpoint_errors(recipe: Recipe) -> Iterator[None]:
    """A checkpoint that does not fit the model as built (a trainable-only checkpoint on other frozen weights)
    becomes an error naming the recipe key that resumed it."""
    try:
        yield
    except FrozenWeightsMismatch as error:
        key, value = ('load_path', recipe.load_path) if recipe.load_path else ('autoresume', recipe.save_folder)
        raise ConfigError(key, value, str(error)) from error


def _metric_values(trainer: Trainer) -> dict[str, float]:
    values = {}
    for evaluator, metrics in trainer.state.eval_metrics.items():
        for name, metric in metrics.items():
            values[f'{evaluator}/{name}'] = float(metric.compute())
    return values


def run_recipe(recipe: Recipe) -> RunSummary:
    """Train ``recipe`` and return its :class:`RunSummary` (on every rank; checksums gathered from all ranks)."""
    trainer, callback, _ = build_trainer(recipe)
    if int(trainer.state.timestamp.batch) > 0:  # a checkpoint's training state loaded (not a weights-only start)
        callback.summary.resumed_from = str(trainer.state.load_path)
        callback.summary.resumed_at_batch = int(trainer.state.timestamp.batch)
    with warnings.catch_warnings():
        # The last eval batch is smaller than the eval batch size; Composer says so on every evaluation.
        warnings.filterwarnings('ignore', message='Cannot split tensor of length')
        with checkpoint_on_interrupt(trainer):  # SIGINT/SIGTERM: save at the end of the batch, then stop
            trainer.fit()
    if callback.last_eval_batch != int(trainer.state.timestamp.batch):
        trainer.eval()
    summary = callback.summary
    summary.eval_metrics = _metric_values(trainer)
    summary.world_size = dist.get_world_size()
    summary.param_checksums = dist.all_gather_object(parameter_checksum(trainer.state.model))
    trainer.close()
    if recipe.summary_path and dist.get_global_rank() == 0:
        atomic_write_text(recipe.summary_path, json.dumps(asdict(summary), indent=2))
    return summary


def _format_bytes(n: float) -> str:
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if n < 1024 or unit == 'GiB':
            return f'{n:.1f} {unit}' if unit != 'B' else f'{int(n)} B'
        n /= 1024
    return f'{n:.1f} GiB'


def format_summary(summary: RunSummary) -> str:
    """The end-of-run table."""
    rows = [
        ('algorithms', ', '.join(summary.algorithms) or '(none: full fine-tuning)'),
        ('processes', str(summary.world_size)),
        *(
            [('resumed from', f'{summary.resumed_from} (batch {summary.resumed_at_batch})')]
            if summary.resumed_from
            else []
        ),
        ('total parameters', f'{summary.total_params:,}'),
        (
            'trainable parameters',
            f'{summary.trainable_params:,} ({summary.trainable_params / max(summary.total_params, 1):.1%})',
        ),
        ('training-state bytes', _format_bytes(summary.training_state_bytes)),
        ('  parameters', _format_bytes(summary.param_bytes)),
        ('  gradients', _format_bytes(summary.grad_bytes)),
        ('  optimizer state', _format_bytes(summary.optimizer_state_bytes)),
        *([('  fp32 masters', _format_bytes(summary.master_bytes))] if summary.master_bytes else []),
        ('peak memory (process)', _format_bytes(summary.peak_memory_bytes)),
        ('train samples/s', f'{summary.samples_per_second:.1f}'),
        ('train batches', str(summary.train_batches)),
        *([('  trained in this run', str(summary.batches_run))] if summary.resumed_from else []),
    ]
    for name, value in summary.eval_metrics.items():
        shown = f'{value:.2%}' if 'Accuracy' in name else f'{value:.4f}'
        rows.append((name, shown))
    if summary.majority_rate is not None:
        rows.append(('majority-class rate', f'{summary.majority_rate:.2%}'))
    width = max(len(name) for name, _ in rows)
    lines = [f'| {"metric".ljust(width)} | value', f'|{"-" * (width + 2)}|{"-" * 40}']
    lines += [f'| {name.ljust(width)} | {value}' for name, value in rows]
    return '\n'.join(lines)
