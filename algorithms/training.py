"""Turn a validated :class:`~composer_thaw.recipe.Recipe` into a Composer ``Trainer``, run it, and summarize it.

Example:
    >>> recipe = load_recipe('yamls/demo.yaml', overrides=['max_duration=10ba'])
    >>> summary = run_recipe(recipe)
    >>> print(format_summary(summary))
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence, Sized
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from composer import Callback, Logger, State, Trainer
from composer.utils import dist, reproducibility
from torch import nn

from composer_thaw.algorithm_state import ConfigRepr
from composer_thaw.atomic_files import atomic_write_text, checkpoint_saver
from composer_thaw.config_validation import ConfigError, check_call_kwargs
from composer_thaw.interruption import checkpoint_on_interrupt
from composer_thaw.loss_guard import StopOnNonFiniteLoss
from composer_thaw.models import ModelTask
from composer_thaw.optimizer_surgery import training_state_bytes
from composer_thaw.parameter_selection import user_module
from composer_thaw.recipe import (
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelismConfig,
    Recipe,
    SchedulerConfig,
    check_processes,
    model_task,
)
from composer_thaw.run_files import complete_latest_link, resume_from_a_complete_checkpoint
from composer_thaw.sharding import full_tensor

__all__ = [
    'DATA_BUILDERS',
    'MODEL_BUILDERS',
    'DataRequest',
    'RecipeData',
    'RecipeModel',
    'RunSummary',
    'TrainingSummary',
    'build_data',
    'build_model',
    'build_named_model',
    'build_recipe_model',
    'build_trainer',
    'format_summary',
    'recipe_model_spec',
    'run_recipe',
]


def _tiny_decoder(config: ModelConfig, label_names: Optional[tuple[str, ...]], task: ModelTask, tokenizer: Any):
    from composer_thaw import models

    return models.tiny_decoder(
        arch=config.arch,
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def _checkpoint(config: ModelConfig, label_names: Optional[tuple[str, ...]], task: ModelTask, tokenizer: Any):
    from composer_thaw import models

    path = models.embedded_minilm_path() if config.name == 'minilm' else config.path
    assert path is not None  # check_recipe: model.name 'hf' needs model.path
    return models.hf_model(path, task, label_names=label_names, tokenizer=tokenizer, dropout=config.dropout)


def _vision(config: ModelConfig, label_names: Optional[tuple[str, ...]], task: ModelTask, tokenizer: Any):
    from composer_thaw.vision import recipe_vision_classifier

    assert label_names is not None  # check_recipe: vision models train on synthetic-images
    return recipe_vision_classifier(config, len(label_names))


# model.name -> (config, class names or None, task, tokenizer or None) -> a Composer model (a HuggingFaceModel for
# text, a ComposerClassifier for images)
MODEL_BUILDERS: dict[str, Callable[..., Any]] = {
    'minilm': _checkpoint,
    'hf': _checkpoint,
    'tiny-decoder': _tiny_decoder,
    'resnet18': _vision,
    'vit': _vision,
}


def build_model(
    config: ModelConfig,
    label_names: Optional[Sequence[str]],
    task: ModelTask = 'classification',
    tokenizer: Any = None,
):
    """The recipe's model (a :class:`composer.models.HuggingFaceModel`, or a ``ComposerClassifier`` for images),
    built for ``task`` (see :func:`composer_thaw.recipe.model_task`); a classifier's classes are ``label_names``
    (from the data)."""
    names = tuple(label_names) if task == 'classification' and label_names is not None else None
    return MODEL_BUILDERS[config.name](config, names, task, tokenizer).to(getattr(torch, config.dtype))


@dataclass(frozen=True)
class RecipeData:
    train_dataloader: torch.utils.data.DataLoader
    eval_dataloader: torch.utils.data.DataLoader
    label_names: Optional[tuple[str, ...]]
    majority_rate: Optional[float]

    @property
    def num_labels(self) -> Optional[int]:
        return None if self.label_names is None else len(self.label_names)


@dataclass(frozen=True)
class DataRequest:
    """What a data builder is asked for: loaders of these per-process batch sizes, tokenized by ``tokenizer``."""

    tokenizer: Any
    train_batch_size: int
    eval_batch_size: int
    seed: int


def _loaders(
    request: DataRequest,
    train_set: Any,
    eval_set: Any,
    label_names: Optional[tuple[str, ...]],
    majority: Optional[float],
    collate_fn: Optional[Callable] = None,
) -> RecipeData:
    from composer_thaw.data import build_dataloader

    tokenizer = request.tokenizer
    return RecipeData(
        build_dataloader(train_set, tokenizer, request.train_batch_size, True, True, collate_fn=collate_fn),
        build_dataloader(eval_set, tokenizer, request.eval_batch_size, False, False, collate_fn=collate_fn),
        label_names,
        majority,
    )


def _stdlib_docs(config: DataConfig, request: DataRequest) -> RecipeData:
    from composer_thaw import data

    train, eval_ = data.stdlib_docs_examples(max_per_class=config.max_per_class)
    train, eval_ = train[: config.max_train_samples], eval_[: config.max_eval_samples]
    counts = torch.bincount(torch.tensor([e.label for e in eval_]), minlength=len(data.STDLIB_DOCS_CLASSES))
    return _loaders(
        request,
        data.ClassificationDataset(train, request.tokenizer, config.max_seq_len),
        data.ClassificationDataset(eval_, request.tokenizer, config.max_seq_len),
        data.STDLIB_DOCS_CLASSES,
        counts.max().item() / max(len(eval_), 1),
    )


def _python_topics(config: DataConfig, request: DataRequest) -> RecipeData:
    from composer_thaw import data

    train_texts, eval_texts = data.python_topics_corpus()
    tokenizer, max_seq_len = request.tokenizer, config.max_seq_len
    return _loaders(
        request,
        data.LanguageModelingDataset(train_texts, tokenizer, max_seq_len, config.max_train_samples),
        data.LanguageModelingDataset(eval_texts, tokenizer, max_seq_len, config.max_eval_samples),
        None,
        None,
    )


def _files(config: DataConfig, request: DataRequest) -> RecipeData:
    from composer_thaw.local_data import load_task_data

    assert config.task is not None and config.train is not None  # check_recipe
    task_data = load_task_data(
        config.task,
        request.tokenizer,
        config.train,
        config.eval,
        eval_fraction=config.eval_fraction,
        data_format=config.format,
        max_seq_len=config.max_seq_len,
        text_column=config.text_column,
        label_column=config.label_column,
        prompt_column=config.prompt_column,
        response_column=config.response_column,
        messages_column=config.messages_column,
        packing=config.packing,
        max_train_samples=config.max_train_samples,
        max_eval_samples=config.max_eval_samples,
        seed=request.seed,
    )
    return _loaders(
        request, task_data.train, task_data.eval, task_data.label_names, task_data.majority_rate, task_data.collate_fn
    )


def _synthetic_images(config: DataConfig, request: DataRequest) -> RecipeData:
    from composer_thaw.vision import synthetic_image_loaders

    train, eval_, num_classes, majority = synthetic_image_loaders(
        request.train_batch_size, request.eval_batch_size, config.max_train_samples, config.max_eval_samples
    )
    return RecipeData(train, eval_, tuple(str(label) for label in range(num_classes)), majority)


# data.name -> (the recipe's data config, what is asked for) -> loaders, class names (classification) and the
# majority-class rate of the eval set. A new kind of data is one more entry.
DATA_BUILDERS: dict[str, Callable[[DataConfig, DataRequest], RecipeData]] = {
    'stdlib-docs': _stdlib_docs,
    'python-topics': _python_topics,
    'files': _files,
    'synthetic-images': _synthetic_images,
}


def build_data(
    config: DataConfig, tokenizer, train_batch_size: int, eval_batch_size: int, seed: int = 17
) -> RecipeData:
    """Train and eval loaders for the recipe's data (batch sizes are per process); a problem with the data is a
    :class:`ConfigError`."""
    return DATA_BUILDERS[config.name](config, DataRequest(tokenizer, train_batch_size, eval_batch_size, seed))


@dataclass(frozen=True)
class RecipeModel:
    """What a recipe trains: the model (as the run builds it), its tokenizer and data."""

    model: Any  # composer.models.HuggingFaceModel
    tokenizer: Any
    data: RecipeData


def build_recipe_model(recipe: Recipe, train_batch_size: Optional[int] = None) -> RecipeModel:
    """Tokenizer, data and model of ``recipe`` (already validated), with the checks that need them: a model folder
    transformers cannot read, bad data, a training set smaller than one batch, a sequence longer than the model's
    positions raise :class:`ConfigError`.

    ``thaw run`` and the previews (``thaw freeze-preview``, ``thaw hift-preview``) build their model here, so they
    see the same model. The data is checked and tokenized before the model is built.

    Example:
        >>> built = build_recipe_model(load_recipe('yamls/lora_decoder.yaml'))
        >>> sum(p.numel() for p in built.model.parameters())
    """
    from composer_thaw.models import load_tokenizer

    per_process = train_batch_size or recipe.global_train_batch_size // dist.get_world_size()
    tokenizer_path = recipe.model.tokenizer or recipe.model.path if recipe.model.name == 'hf' else None
    with _model_folder_errors(recipe, 'no tokenizer loads from there', _tokenizer_key(recipe)):
        tokenizer = load_tokenizer(tokenizer_path)
    data = build_data(recipe.data, tokenizer, per_process, recipe.eval_batch_size, recipe.seed)
    if len(data.train_dataloader) == 0:  # batches drop the remainder, so a too small set would train nothing
        train_set = data.train_dataloader.dataset
        assert isinstance(train_set, Sized)  # build_data's data sets have a length
        raise ConfigError(
            'global_train_batch_size',
            recipe.global_train_batch_size,
            f'the training set has only {len(train_set)} examples '
            f'(data.max_train_samples={recipe.data.max_train_samples}), too few for one batch; lower the batch size '
            'or use more data.',
        )
    with _model_folder_errors(recipe, 'not a loadable Hugging Face checkpoint'):
        model = build_model(recipe.model, data.label_names, model_task(recipe), tokenizer)
    _check_sequence_length(recipe, model)
    return RecipeModel(model, tokenizer, data)


def build_named_model(source: str):
    """The model a preview names without a recipe: ``'minilm'`` (the built-in task's 6 classes), ``'tiny-decoder'``,
    or a local checkpoint folder built for its own task (:func:`composer_thaw.models.default_task`) with its saved
    labels. A folder transformers cannot read raises :class:`ConfigError` naming it."""
    from composer_thaw.data import STDLIB_DOCS_CLASSES
    from composer_thaw.models import default_task, load_tokenizer

    if source in ('minilm', 'tiny-decoder'):
        config = ModelConfig(name=source)  # type: ignore[arg-type]  # one of the two names
        return build_model(config, STDLIB_DOCS_CLASSES, 'causal_lm' if source == 'tiny-decoder' else 'classification')
    recipe = Recipe(model=ModelConfig(name='hf', path=source))
    with _model_folder_errors(recipe, 'not a loadable Hugging Face checkpoint'):
        tokenizer = load_tokenizer(source)
        from transformers import AutoConfig

        saved = AutoConfig.from_pretrained(source)
        task = default_task(saved)
        labels = tuple(str(saved.id2label[i]) for i in range(saved.num_labels))
        return build_model(recipe.model, labels, task, tokenizer)


def recipe_model_spec(recipe: Recipe):
    """The recipe's model as ``thaw estimate --model-config recipe.yaml`` sees it: a
    :class:`~composer_thaw.memory_estimate.ModelSpec` with the Hugging Face config the run builds (its task, the
    classes read from the recipe's data, its pad token), without loading the weights of a local checkpoint."""
    from composer_thaw.memory_estimate import ModelSpec, spec_of
    from composer_thaw.models import hf_model_config, load_tokenizer

    task = model_task(recipe)
    path = recipe.model.tokenizer or recipe.model.path if recipe.model.name == 'hf' else None
    with _model_folder_errors(recipe, 'no tokenizer loads from there', _tokenizer_key(recipe)):
        tokenizer = load_tokenizer(path)
    labels = build_data(recipe.data, tokenizer, 1, 1, recipe.seed).label_names if task == 'classification' else None
    if recipe.model.name != 'hf':  # built-in models are small: build the real one
        reproducibility.seed_all(recipe.seed)
        return spec_of(build_model(recipe.model, labels, task, tokenizer))
    assert recipe.model.path is not None  # check_recipe
    with _model_folder_errors(recipe, 'not a loadable Hugging Face checkpoint'):
        config = hf_model_config(recipe.model.path, task, labels, tokenizer, recipe.model.dropout)
    return ModelSpec(config, 'sequence-classification' if task == 'classification' else 'causal-lm', recipe.model.path)


def _tokenizer_key(recipe: Recipe) -> str:
    return 'model.tokenizer' if recipe.model.tokenizer else 'model.path'


def build_optimizer(model: nn.Module, config: OptimizerConfig) -> torch.optim.Optimizer:
    """The recipe's optimizer; with ``no_decay_bias_and_norm``, 1-D parameters form a second group without decay."""
    import composer.optim

    params = [p for p in model.parameters() if p.requires_grad]
    if config.no_decay_bias_and_norm and config.weight_decay > 0:
        groups: list[dict[str, Any]] = [
            {'params': [p for p in params if p.ndim >= 2]},
            {'params': [p for p in params if p.ndim < 2], 'weight_decay': 0.0},
        ]
    else:
        groups = [{'params': params}]
    beta1, beta2 = config.betas  # check_recipe: two numbers
    betas = (beta1, beta2)
    lr, weight_decay = config.lr, config.weight_decay
    if config.name == 'adamw':
        return torch.optim.AdamW(groups, betas=betas, eps=config.eps, lr=lr, weight_decay=weight_decay)
    if config.name == 'adam':
        return torch.optim.Adam(groups, betas=betas, eps=config.eps, lr=lr, weight_decay=weight_decay)
    if config.name == 'decoupled_adamw':
        return composer.optim.DecoupledAdamW(groups, betas=betas, eps=config.eps, lr=lr, weight_decay=weight_decay)
    if config.name == 'sgd':
        return torch.optim.SGD(groups, momentum=config.momentum, lr=lr, weight_decay=weight_decay)
    if config.name == 'decoupled_sgdw':
        return composer.optim.DecoupledSGDW(groups, momentum=config.momentum, lr=lr, weight_decay=weight_decay)
    return torch.optim.Adagrad(groups, eps=config.eps, lr=lr, weight_decay=weight_decay)


def build_parallelism(config: ParallelismConfig) -> Optional[dict[str, Any]]:
    """Composer's ``parallelism_config`` for the recipe: FSDP2 with the recipe's options, or ``None`` (DDP)."""
    if config.fsdp is None:
        return None
    from composer.utils.parallelism import FSDP2Config

    return {'fsdp': FSDP2Config(**asdict(config.fsdp))}


def build_scheduler(config: SchedulerConfig):
    from composer.optim import ConstantScheduler, CosineAnnealingWithWarmupScheduler, LinearWithWarmupScheduler

    if config.name == 'constant':
        return ConstantScheduler()
    if config.name == 'linear_with_warmup':
        return LinearWithWarmupScheduler(t_warmup=config.t_warmup, alpha_f=config.alpha_f)
    return CosineAnnealingWithWarmupScheduler(t_warmup=config.t_warmup, alpha_f=config.alpha_f)


def _logger_classes() -> dict[str, type]:
    from composer import loggers

    return {
        'console': loggers.ConsoleLogger,
        'file': loggers.FileLogger,
        'tensorboard': loggers.TensorboardLogger,
        'wandb': loggers.WandBLogger,
        'mlflow': loggers.MLFlowLogger,
    }


def build_loggers(config: dict[str, Optional[dict[str, Any]]]) -> list:
    classes = _logger_classes()
    built = []
    for name, kwargs in config.items():
        check_call_kwargs(f'loggers.{name}', classes[name], kwargs or {})
        built.append(classes[name](**(kwargs or {})))
    return built


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
    from composer_thaw.registry import build_algorithm

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
    with _algorithm_errors(recipe, algorithms):  # they check themselves against the model at INIT and BEFORE_LOAD
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
def _model_folder_errors(recipe: Recipe, problem: str, key: str = 'model.path') -> Iterator[None]:
    """What transformers (or safetensors) cannot read in a local checkpoint folder becomes an error naming
    ``model.path``: a broken config.json, missing or truncated weights, missing tokenizer files."""
    from safetensors import SafetensorError

    if recipe.model.name != 'hf':
        yield
        return
    try:
        yield
    except ConfigError:
        raise
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(key, getattr(recipe.model, key.split('.')[-1]), f'{problem}: {detail}') from error


def _check_sequence_length(recipe: Recipe, model: nn.Module) -> None:
    config = getattr(getattr(model, 'model', model), 'config', None)
    positions = getattr(config, 'max_position_embeddings', None) or getattr(config, 'n_positions', None)
    if isinstance(positions, int) and recipe.data.max_seq_len > positions:
        raise ConfigError(
            'data.max_seq_len',
            recipe.data.max_seq_len,
            f'the model has {positions} positions; use at most {positions}.',
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


def _metric_values(trainer: Trainer) -> dict[str, float]:
    values = {}
    for evaluator, metrics in trainer.state.eval_metrics.items():
        for name, metric in metrics.items():
            values[f'{evaluator}/{name}'] = float(metric.compute())
    return values


def run_recipe(recipe: Recipe) -> RunSummary:
    """Train ``recipe`` and return its :class:`RunSummary` (on every rank; checksums gathered from all ranks)."""
    trainer, callback, _ = build_trainer(recipe)
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
