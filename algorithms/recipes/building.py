"""Build what a validated :class:`~composer_thaw.recipes.schema.Recipe` names: its model, its data, optimizer,
scheduler, loggers and parallelism, and its model's size without weights (:func:`recipe_model_spec`, for ``thaw
estimate``). :mod:`~composer_thaw.recipes.running` puts them into a Composer ``Trainer``.

Each ``model.name`` and ``data.name`` has one builder (:data:`MODEL_BUILDERS`, :data:`DATA_BUILDERS`).

Example:
    >>> from composer_thaw.recipes.schema import load_recipe
    >>> recipe = load_recipe('yamls/demo.yaml', overrides=['data.max_train_samples=64', 'data.max_eval_samples=8'])
    >>> built = build_recipe_model(recipe)  # the model, its data (read first, for the classes) and its task
    >>> type(built.model.model).__name__, built.data.label_names
    ('BertForSequenceClassification', ('asyncio', 'email', 'http', 'logging', 'unittest', 'xml'))
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence, Sized
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch
from composer.utils import dist, reproducibility
from torch import nn

from composer_thaw.core.validation import ConfigError, check_call_kwargs
from composer_thaw.datasets.builtin import (
    STDLIB_DOCS_CLASSES,
    ClassificationDataset,
    LanguageModelingDataset,
    build_dataloader,
    python_topics_corpus,
    stdlib_docs_examples,
)
from composer_thaw.datasets.local_files import load_task_data
from composer_thaw.models.builtin import (
    ModelTask,
    default_task,
    embedded_minilm_path,
    hf_model,
    hf_model_config,
    load_tokenizer,
    tiny_decoder,
)
from composer_thaw.models.specs import ModelSpec, spec_of
from composer_thaw.models.vision import IMAGE_SIZE, synthetic_image_loaders, vision_classifier
from composer_thaw.recipes.schema import (
    DataConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelismConfig,
    Recipe,
    SchedulerConfig,
    check_sequence_length,
    model_task,
)
from composer_thaw.utils.hybrid_sharding import HSDPConfig
from composer_thaw.utils.sharding import average_gradients_on_gloo

__all__ = [
    'DATA_BUILDERS',
    'MODEL_BUILDERS',
    'DataRequest',
    'RecipeData',
    'RecipeModel',
    'build_data',
    'build_loggers',
    'build_model',
    'build_named_model',
    'build_optimizer',
    'build_parallelism',
    'build_recipe_model',
    'build_scheduler',
    'recipe_model_spec',
]


def _tiny_decoder(config: ModelConfig, label_names: Optional[tuple[str, ...]], task: ModelTask, tokenizer: Any):
    return tiny_decoder(
        arch=config.arch,
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        num_heads=config.num_heads,
        tie_word_embeddings=config.tie_word_embeddings,
    )


def _checkpoint(config: ModelConfig, label_names: Optional[tuple[str, ...]], task: ModelTask, tokenizer: Any):
    path = embedded_minilm_path() if config.name == 'minilm' else config.path
    assert path is not None  # check_recipe: model.name 'hf' needs model.path
    return hf_model(path, task, label_names=label_names, tokenizer=tokenizer, dropout=config.dropout)


def _vision(config: ModelConfig, label_names: Optional[tuple[str, ...]], task: ModelTask, tokenizer: Any):
    """``model: {name: resnet18}`` or ``{name: vit, num_layers, hidden_size, num_heads}`` for images of side
    :data:`~composer_thaw.models.vision.IMAGE_SIZE`."""
    assert label_names is not None  # check_recipe: vision models train on synthetic-images
    if config.name == 'vit':
        options = {'num_layers': config.num_layers, 'hidden_dim': config.hidden_size, 'num_heads': config.num_heads}
        return vision_classifier('vit', len(label_names), IMAGE_SIZE, **options)
    return vision_classifier('resnet18', len(label_names), IMAGE_SIZE)


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
    built for ``task`` (see :func:`composer_thaw.recipes.schema.model_task`); a classifier's classes are ``label_names``
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
    tokenizer = request.tokenizer
    return RecipeData(
        build_dataloader(train_set, tokenizer, request.train_batch_size, True, True, collate_fn=collate_fn),
        build_dataloader(eval_set, tokenizer, request.eval_batch_size, False, False, collate_fn=collate_fn),
        label_names,
        majority,
    )


def _stdlib_docs(config: DataConfig, request: DataRequest) -> RecipeData:
    train, eval_ = stdlib_docs_examples(max_per_class=config.max_per_class)
    train, eval_ = train[: config.max_train_samples], eval_[: config.max_eval_samples]
    counts = torch.bincount(torch.tensor([e.label for e in eval_]), minlength=len(STDLIB_DOCS_CLASSES))
    return _loaders(
        request,
        ClassificationDataset(train, request.tokenizer, config.max_seq_len),
        ClassificationDataset(eval_, request.tokenizer, config.max_seq_len),
        STDLIB_DOCS_CLASSES,
        counts.max().item() / max(len(eval_), 1),
    )


def _python_topics(config: DataConfig, request: DataRequest) -> RecipeData:
    train_texts, eval_texts = python_topics_corpus()
    tokenizer, max_seq_len = request.tokenizer, config.max_seq_len
    return _loaders(
        request,
        LanguageModelingDataset(train_texts, tokenizer, max_seq_len, config.max_train_samples),
        LanguageModelingDataset(eval_texts, tokenizer, max_seq_len, config.max_eval_samples),
        None,
        None,
    )


def _files(config: DataConfig, request: DataRequest) -> RecipeData:
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
        >>> from composer_thaw.recipes.schema import load_recipe
        >>> built = build_recipe_model(load_recipe('yamls/lora_decoder.yaml', overrides=['data.max_seq_len=16']))
        >>> f'{sum(p.numel() for p in built.model.parameters()):,}'  # the recipe's tiny decoder
        '8,470,144'
    """
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
    or a local checkpoint folder built for its own task (:func:`composer_thaw.models.builtin.default_task`) with its
    saved
    labels. A folder transformers cannot read raises :class:`ConfigError` naming it."""
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
    :class:`~composer_thaw.recipes.memory_estimate.ModelSpec` with the Hugging Face config the run builds (its task, the
    classes read from the recipe's data, its pad token), without loading the weights of a local checkpoint."""

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
    """Composer's ``parallelism_config`` for the recipe: FSDP2 with the recipe's options (HSDP when it sets
    ``data_parallel_replicate_degree``), or ``None`` (DDP)."""
    if config.fsdp is None:
        return None
    from composer.utils.parallelism import FSDP2Config

    average_gradients_on_gloo()  # FSDP2 on CPU sums gradients across processes without it
    options = asdict(config.fsdp)
    if options['data_parallel_replicate_degree'] is not None:
        return {'fsdp': HSDPConfig(**options)}
    del options['data_parallel_replicate_degree'], options['data_parallel_shard_degree']
    return {'fsdp': FSDP2Config(**options)}


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
    """The built model's positions (a built-in model's too; a local folder's were read from its config.json)."""
    config = getattr(getattr(model, 'model', model), 'config', None)
    positions = getattr(config, 'max_position_embeddings', None) or getattr(config, 'n_positions', None)
    check_sequence_length(recipe.data.max_seq_len, positions if isinstance(positions, int) else None)
