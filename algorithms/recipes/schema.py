"""YAML training recipes: schema, loading, ``--set`` overrides and validation before anything is built.

A recipe names the model, data, optimizer, scheduler, duration, evaluation, loggers and an ``algorithms:``
mapping in llm-foundry's style::

    model: {name: minilm}
    data: {name: stdlib-docs, max_seq_len: 64}
    optimizer: {name: adamw, lr: 1.0e-4, weight_decay: 0.01}
    max_duration: 2ep
    algorithms:
      gradient_clipping: {clipping_type: norm, clipping_threshold: 1.0}

Example:
    >>> recipe = load_recipe('yamls/demo.yaml', overrides=['max_duration=1ep'])
    >>> recipe.model.name
    'minilm'

Why one module: the recipe's dataclasses and the checks between their sections (model against data, algorithms
against precision and parallelism) read together; the checks run before anything heavy is imported.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from composer_thaw.core.validation import ConfigError, from_mapping
from composer_thaw.datasets.local_files import NO_CHAT_TEMPLATE, check_task_rows, load_table, source_format
from composer_thaw.recipes.model_folders import (
    check_checkpoint_folder,
    check_tokenizer_folder,
    has_chat_template,
    positions_of,
)
from composer_thaw.recipes.run_files import (
    LATEST_LINK,
    check_checkpoint_path,
    check_writable_folder,
    checkpoint_to_resume,
)

__all__ = [
    'DataConfig',
    'FSDPOptions',
    'ModelConfig',
    'OptimizerConfig',
    'ParallelismConfig',
    'Recipe',
    'SchedulerConfig',
    'apply_overrides',
    'check_processes',
    'data_task',
    'load_recipe',
    'model_task',
    'recipe_from_mapping',
    'recipe_to_mapping',
]

LOGGER_NAMES = ('console', 'file', 'tensorboard', 'wandb', 'mlflow')
# The package each logger imports (Composer's own loggers need nothing more).
LOGGER_PACKAGES = {'tensorboard': 'tensorboard', 'wandb': 'wandb', 'mlflow': 'mlflow'}
# Learning rates above this diverge with every optimizer the recipes offer (the run would end in NaN losses).
MAX_LEARNING_RATE = 10.0


@dataclass
class ModelConfig:
    """``minilm``: the embedded all-MiniLM-L6-v2 classifier; ``hf``: a local checkpoint at ``path``, built for
    ``task`` (by default the data's: ``classification`` for labelled data, ``causal_lm`` for text and instructions)
    with the tokenizer of ``tokenizer`` (default: ``path``); ``tiny-decoder``: the built-in randomly initialized
    causal LM; ``resnet18``, ``vit``: torchvision image classifiers (:mod:`composer_thaw.models.vision`; the ViT takes
    ``num_layers``, ``hidden_size``, ``num_heads``)."""

    name: Literal['minilm', 'hf', 'tiny-decoder', 'resnet18', 'vit'] = 'minilm'
    path: Optional[str] = None
    task: Optional[Literal['causal_lm', 'classification']] = None
    tokenizer: Optional[str] = None
    arch: Literal['llama', 'gpt2'] = 'llama'
    num_layers: int = 4
    hidden_size: int = 64
    num_heads: int = 4
    tie_word_embeddings: bool = False
    dropout: Optional[float] = None
    # The weights' dtype; 'bfloat16' with an algorithm's master_weights: fp32 (fp32 masters only for what trains).
    dtype: Literal['float32', 'bfloat16', 'float16'] = 'float32'


@dataclass
class DataConfig:
    """``stdlib-docs``: 6-class docstring classification; ``python-topics``: language modelling text; ``files``:
    your own rows for ``task`` from ``train`` and ``eval`` (or ``eval_fraction`` of ``train``): JSON Lines, CSV,
    Parquet or text files, globs, lists of them, or ``save_to_disk`` folders (see
    :mod:`composer_thaw.datasets.local_files`);
    ``synthetic-images``: 10-class synthetic images for the vision models."""

    name: Literal['stdlib-docs', 'python-topics', 'files', 'synthetic-images'] = 'stdlib-docs'
    task: Optional[Literal['classification', 'causal_lm', 'instruction']] = None
    train: Optional[Union[str, list[str]]] = None
    eval: Optional[Union[str, list[str]]] = None
    eval_fraction: Optional[float] = None
    format: Optional[Literal['json', 'csv', 'parquet', 'text']] = None
    text_column: str = 'text'
    label_column: str = 'label'
    prompt_column: str = 'prompt'
    response_column: str = 'response'
    messages_column: Optional[str] = None
    packing: bool = False
    max_seq_len: int = 64
    max_per_class: int = 280
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None


@dataclass
class OptimizerConfig:
    name: Literal['adamw', 'adam', 'sgd', 'adagrad', 'decoupled_adamw', 'decoupled_sgdw'] = 'adamw'
    lr: float = 5.0e-5
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1.0e-8
    momentum: float = 0.0
    no_decay_bias_and_norm: bool = True


@dataclass
class SchedulerConfig:
    name: Literal['constant', 'linear_with_warmup', 'cosine_with_warmup'] = 'linear_with_warmup'
    t_warmup: str = '0.06dur'
    alpha_f: float = 0.0


@dataclass
class FSDPOptions:
    """Composer's FSDP2: every parameter sharded on dim 0 across the processes (``thaw run --nproc N``). The fields
    are those of :class:`composer.utils.parallelism.FSDP2Config`; ``state_dict_type`` is the checkpoint format.

    Hybrid sharding (HSDP): ``data_parallel_replicate_degree`` copies of the model (typically one per node), each
    sharded over ``data_parallel_shard_degree`` processes (``-1``: the processes divided by the copies), gradients
    all-reduced across the copies (:class:`composer_thaw.utils.hybrid_sharding.HSDPConfig`)."""

    state_dict_type: Literal['sharded', 'full'] = 'sharded'
    reshard_after_forward: bool = True
    activation_checkpointing: bool = False
    activation_cpu_offload: bool = False
    load_monolith_rank0_only: bool = False
    mixed_precision: Literal['DEFAULT', 'PURE', 'FULL'] = 'DEFAULT'
    data_parallel_replicate_degree: Optional[int] = None
    data_parallel_shard_degree: int = -1


@dataclass
class ParallelismConfig:
    """How the model is spread over processes; ``fsdp: {}`` shards it with FSDP2, absent or null replicates it (DDP)."""

    fsdp: Optional[FSDPOptions] = None


@dataclass
class Recipe:
    """A whole training run. Durations and intervals are Composer time strings (``2ep``, ``100ba``, ``0.5dur``)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    algorithms: dict[str, Optional[dict[str, Any]]] = field(default_factory=dict)
    loggers: dict[str, Optional[dict[str, Any]]] = field(default_factory=dict)
    seed: int = 17
    run_name: Optional[str] = None
    max_duration: Union[str, int] = '2ep'
    eval_interval: Union[str, int] = '1ep'
    global_train_batch_size: int = 32
    device_train_microbatch_size: Optional[int] = None
    eval_batch_size: int = 64
    device: Optional[Literal['cpu', 'gpu']] = None
    precision: Optional[Literal['fp32', 'amp_fp16', 'amp_bf16']] = None
    progress_bar: bool = True
    save_folder: Optional[str] = None
    save_interval: Union[str, int] = '1ep'
    load_path: Optional[str] = None
    load_weights_only: bool = False
    autoresume: bool = False
    summary_path: Optional[str] = None


_TIME_EXAMPLES = "a Composer time string such as '2ep', '100ba', '1000sp' or '0.5dur'"


def _check_time(key: str, value: Union[str, int], *, positive: bool = False, fraction: bool = True) -> None:
    """``value`` is a whole number of epochs or a Composer time string with a whole count (or a fraction of the
    run in ``dur``, where ``fraction``); ``positive`` refuses zero, which would run or save nothing."""
    from composer.core import Time, TimeUnit

    valid = (
        f'expected {_TIME_EXAMPLES}'
        if fraction
        else "expected a Composer time string such as '2ep', '100ba' or '1000sp'"
    )
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(key, value, f'{valid}.')
    if isinstance(value, int):
        count: float = value
    else:
        try:
            time = Time.from_timestring(value)
        except TypeError:  # a fraction of a unit that counts whole things ('1.5ep')
            raise ConfigError(key, value, f'epochs, batches, samples and tokens are whole numbers; {valid}.') from None
        except ValueError:
            raise ConfigError(key, value, f'{valid}.') from None
        if time.unit == TimeUnit.DURATION and not fraction:
            raise ConfigError(key, value, f"a fraction of the run cannot set the run's own length; {valid}.")
        if time.unit != TimeUnit.DURATION and not float(time.value).is_integer():
            raise ConfigError(key, value, f'a whole number of {time.unit.value}s is needed; {valid}.')
        count = time.value
    if count < 0 or (positive and count == 0):
        raise ConfigError(key, value, f'expected a {"positive" if positive else "non-negative"} duration.')


def _check_positive(key: str, value: Optional[Union[int, float]]) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(key, value, 'expected a positive, finite number.')


def validate_recipe(recipe: Recipe) -> None:
    """Check everything that can be checked without building the model: values, files, algorithm options.

    The model's and the data's files come first, before Composer and torch are imported: a bad file is refused in
    about a second."""
    folder_config = _check_model(recipe.model)
    _check_data(recipe.data)
    if folder_config is not None:
        _check_model_folder_against_data(recipe.model, folder_config, recipe.data)
    _check_time('max_duration', recipe.max_duration, positive=True, fraction=False)
    _check_time('eval_interval', recipe.eval_interval, positive=True)
    _check_time('save_interval', recipe.save_interval, positive=True)
    _check_time('scheduler.t_warmup', recipe.scheduler.t_warmup)
    for key in ('global_train_batch_size', 'device_train_microbatch_size', 'eval_batch_size'):
        _check_positive(key, getattr(recipe, key))
    _check_parallelism(recipe.parallelism.fsdp)
    for key in ('lr', 'eps'):
        _check_positive(f'optimizer.{key}', getattr(recipe.optimizer, key))
    for key in ('max_seq_len', 'max_per_class', 'max_train_samples', 'max_eval_samples'):
        _check_positive(f'data.{key}', getattr(recipe.data, key))
    if recipe.optimizer.lr > MAX_LEARNING_RATE:
        raise ConfigError(
            'optimizer.lr', recipe.optimizer.lr, f'above {MAX_LEARNING_RATE:g} every supported optimizer diverges.'
        )
    if not (math.isfinite(recipe.optimizer.weight_decay) and recipe.optimizer.weight_decay >= 0):
        raise ConfigError('optimizer.weight_decay', recipe.optimizer.weight_decay, 'expected a number >= 0.')
    if len(recipe.optimizer.betas) != 2 or not all(0 <= b < 1 for b in recipe.optimizer.betas):
        raise ConfigError('optimizer.betas', recipe.optimizer.betas, 'expected two numbers in [0, 1).')
    import torch

    if recipe.device == 'gpu' and not torch.cuda.is_available():
        raise ConfigError('device', 'gpu', 'no CUDA device is visible on this machine; use cpu, or null to pick.')
    on_cpu = recipe.device == 'cpu' or (recipe.device is None and not torch.cuda.is_available())
    if on_cpu and recipe.precision not in (None, 'fp32'):
        raise ConfigError('precision', recipe.precision, "mixed precision needs a GPU; on CPU use 'fp32' (or null).")
    if recipe.model.dropout is not None and not 0 <= recipe.model.dropout < 1:
        raise ConfigError('model.dropout', recipe.model.dropout, 'expected a number in [0, 1) or null.')
    with_masters = [name for name, options in recipe.algorithms.items() if (options or {}).get('master_weights')]
    if with_masters and recipe.model.dtype == 'float32':
        raise ConfigError(
            'model.dtype',
            'float32',
            f'{", ".join(with_masters)} set master_weights, which keeps fp32 master copies of low-precision weights: '
            'set model.dtype: bfloat16 (or float16), or drop master_weights to train in fp32.',
        )

    from composer_thaw.models.vision import check_vision_recipe  # deferred: torch, so bad files fail fast

    vision_problem = check_vision_recipe(recipe.model.name, recipe.data.name)
    if vision_problem is not None:
        raise ConfigError(*vision_problem)
    _check_task(recipe.model, recipe.data)
    model = recipe.model
    for key in ('num_layers', 'hidden_size', 'num_heads'):
        _check_positive(f'model.{key}', getattr(model, key))

    if recipe.load_weights_only and recipe.load_path is None:
        raise ConfigError('load_weights_only', True, 'needs load_path: the checkpoint whose weights to start from.')
    if recipe.autoresume and (recipe.run_name is None or recipe.save_folder is None):
        raise ConfigError(
            'autoresume',
            True,
            'needs run_name and save_folder: it resumes from the latest checkpoint of that run there.',
        )
    for name in recipe.loggers:
        if name not in LOGGER_NAMES:
            raise ConfigError(f'loggers.{name}', name, f'unknown logger; valid loggers: {", ".join(LOGGER_NAMES)}.')
        package = LOGGER_PACKAGES.get(name)
        if package is not None and importlib.util.find_spec(package) is None:
            raise ConfigError(f'loggers.{name}', name, f'needs the {package!r} package: pip install {package}.')
    if recipe.save_folder is not None:
        check_writable_folder('save_folder', recipe.save_folder)
    if recipe.load_path is not None and '://' not in recipe.load_path:
        check_checkpoint_path('load_path', recipe.load_path, sharded=_saves_sharded(recipe))

    # deferred: Composer and the algorithms load only once the file-level checks above have passed
    from composer_thaw.core.checkpoint_algorithms import check_checkpoint_algorithms, check_resume_compatibility
    from composer_thaw.core.registry import build_algorithm

    built = [build_algorithm(name, kwargs) for name, kwargs in recipe.algorithms.items()]
    resumed = _resumed_checkpoint(recipe)
    if resumed is not None and resumed.is_file():
        try:
            check_checkpoint_algorithms(resumed, built)
        except ValueError as error:
            raise ConfigError('algorithms', list(recipe.algorithms), str(error)) from error
        check_resume_compatibility(resumed, built)  # ResumeConfigError: algorithms.<name>.<field> = <new value>


def _resumed_checkpoint(recipe: Recipe) -> Optional[Path]:
    """The checkpoint whose training state (algorithms' too) the run will load, if any: autoresume's latest one
    (which Composer loads in full, whatever load_weights_only says), else load_path unless only its weights load."""
    if recipe.autoresume and recipe.save_folder is not None:
        latest = checkpoint_to_resume(recipe.save_folder)
        if latest is not None:
            return latest
    if recipe.load_path is None or recipe.load_weights_only or '://' in recipe.load_path:
        return None
    link = LATEST_LINK.search(Path(recipe.load_path).name)
    if link is not None and Path(recipe.load_path).is_symlink():
        return checkpoint_to_resume(str(Path(recipe.load_path).parent), int(link.group(1)), 'load_path')
    return Path(recipe.load_path)


# What each built-in data set is for; a recipe's files declare theirs in data.task.
BUILTIN_DATA_TASKS = {
    'stdlib-docs': 'classification',
    'python-topics': 'causal_lm',
    'synthetic-images': 'classification',
}
# Keys only data.name 'files' reads (the built-in sets ignore them, so setting one is a mistake to report).
_FILE_DATA_KEYS = ('task', 'train', 'eval', 'eval_fraction', 'format', 'messages_column')


def _check_model(model: ModelConfig) -> Optional[dict[str, Any]]:
    """Check the model's keys, and a local folder's files: its ``config.json`` settings are returned (``None`` for a
    built-in model)."""
    if model.name == 'hf':
        if model.path is None:
            raise ConfigError(
                'model.path', None, "model.name 'hf' needs model.path: a local Hugging Face checkpoint directory."
            )
        if not (Path(model.path) / 'config.json').is_file():
            raise ConfigError(
                'model.path',
                model.path,
                'no Hugging Face checkpoint there (expected a directory containing config.json). Use a local path, '
                "or model.name 'minilm' for the embedded all-MiniLM-L6-v2.",
            )
        if model.tokenizer is not None and not Path(model.tokenizer).is_dir():
            raise ConfigError(
                'model.tokenizer', model.tokenizer, 'expected a local folder holding a tokenizer (or null: model.path).'
            )
        config = check_checkpoint_folder('model.path', model.path)
        check_tokenizer_folder('model.tokenizer' if model.tokenizer else 'model.path', model.tokenizer or model.path)
        return config
    for key in ('path', 'tokenizer', 'task'):
        if getattr(model, key) is not None:
            raise ConfigError(
                f'model.{key}',
                getattr(model, key),
                f"only model.name 'hf' takes a {key}; model.name is {model.name!r}.",
            )
    return None


def check_sequence_length(max_seq_len: int, positions: Optional[int]) -> None:
    """Raise unless examples of ``max_seq_len`` tokens fit a model of ``positions`` positions (``None``: unknown)."""
    if positions is not None and max_seq_len > positions:
        raise ConfigError(
            'data.max_seq_len', max_seq_len, f'the model has {positions} positions; use at most {positions}.'
        )


def _check_model_folder_against_data(model: ModelConfig, config: dict[str, Any], data: DataConfig) -> None:
    """A local model's positions (from its ``config.json`` settings) and its tokenizer's chat template, read from
    its files, against the data."""
    check_sequence_length(data.max_seq_len, positions_of(config))
    assert model.path is not None  # a local model (_check_model)
    if data.messages_column is not None and not has_chat_template(model.tokenizer or model.path):
        raise ConfigError('data.messages_column', data.messages_column, NO_CHAT_TEMPLATE)


def _check_data(data: DataConfig) -> None:
    if data.name != 'files':
        for key in _FILE_DATA_KEYS:
            if getattr(data, key) is not None:
                raise ConfigError(
                    f'data.{key}', getattr(data, key), f"only data.name 'files' reads it; data.name is {data.name!r}."
                )
        if data.packing:
            raise ConfigError('data.packing', True, "only data.name 'files' with data.task 'causal_lm' packs texts.")
        return
    if data.task is None:
        raise ConfigError(
            'data.task', None, "data.name 'files' needs data.task: classification, causal_lm or instruction."
        )
    if data.train is None:
        raise ConfigError(
            'data.train',
            None,
            "data.name 'files' needs data.train: a file, a glob, a list of files or a save_to_disk folder.",
        )
    if (data.eval is None) == (data.eval_fraction is None):
        raise ConfigError(
            'data.eval',
            data.eval,
            'give either an eval source (data.eval) or a share of the training rows (data.eval_fraction), not '
            + ('both.' if data.eval is not None else 'neither.'),
        )
    if data.eval_fraction is not None and not 0 < data.eval_fraction < 1:
        raise ConfigError('data.eval_fraction', data.eval_fraction, 'expected a number between 0 and 1 (exclusive).')
    if data.packing and data.task != 'causal_lm':
        raise ConfigError('data.packing', True, f"packing joins texts for data.task 'causal_lm', not {data.task!r}.")
    source_format('data.train', data.train, data.format)
    if data.eval is not None:
        source_format('data.eval', data.eval, data.format)
    # Read now (datasets caches what it parsed for the run): an unreadable, empty or malformed file, a missing
    # column, a row of the wrong kind or a missing label is refused before Composer or transformers load. What needs
    # the tokenizer (tokens, the chat template's rendering) is checked as the run tokenizes.
    columns = {
        key: getattr(data, key)
        for key in ('text_column', 'label_column', 'prompt_column', 'response_column', 'messages_column')
    }
    label_names = check_task_rows(data.task, load_table('data.train', data.train, data.format), **columns)
    if data.eval is not None:
        eval_table = load_table('data.eval', data.eval, data.format)
        check_task_rows(data.task, eval_table, label_names=label_names, source_key='data.eval', **columns)


def data_task(data: DataConfig) -> str:
    """What the recipe's data is for: ``classification``, ``causal_lm`` or ``instruction``."""
    return (
        data.task
        if data.name == 'files' and data.task is not None
        else BUILTIN_DATA_TASKS.get(data.name, 'classification')
    )


def model_task(recipe: Recipe) -> Literal['causal_lm', 'classification']:
    """The task the recipe's model is built for: ``model.task``, else the data's (instruction tuning trains a
    causal LM)."""
    if recipe.model.task is not None:
        return recipe.model.task
    if recipe.model.name == 'tiny-decoder':
        return 'causal_lm'
    if recipe.model.name in ('minilm', 'resnet18', 'vit'):
        return 'classification'
    return 'classification' if data_task(recipe.data) == 'classification' else 'causal_lm'


def _check_task(model: ModelConfig, data: DataConfig) -> None:
    task = data_task(data)
    wanted = 'classification' if task == 'classification' else 'causal_lm'
    built_for = {
        'tiny-decoder': 'causal_lm',
        'minilm': 'classification',
        'resnet18': 'classification',
        'vit': 'classification',
    }
    has = model.task or built_for.get(model.name, wanted)
    if has == wanted:
        return
    if data.name == 'files':
        raise ConfigError(
            'data.task',
            task,
            f'model {model.name!r} is built for {has}, which cannot learn {task} data; '
            + (
                'use a causal LM (model.task: causal_lm).'
                if wanted == 'causal_lm'
                else 'use model.task: classification.'
            ),
        )
    builtin = next(name for name, t in BUILTIN_DATA_TASKS.items() if t == has)
    what = 'a language model' if has == 'causal_lm' else 'a classifier'
    raise ConfigError('data.name', data.name, f'model {model.name!r} is {what}: use data.name {builtin!r} (or files).')


def check_processes(recipe: Recipe, processes: int, described_as: str) -> None:
    """Raise unless ``global_train_batch_size`` splits evenly across ``processes`` (named ``described_as``) and a
    hybrid-sharding layout fits them."""
    if recipe.global_train_batch_size % processes:
        raise ConfigError(
            'global_train_batch_size',
            recipe.global_train_batch_size,
            f'must be divisible by the number of processes ({described_as}).',
        )
    fsdp = recipe.parallelism.fsdp
    if fsdp is None or fsdp.data_parallel_replicate_degree is None:
        return
    replicas, shards = fsdp.data_parallel_replicate_degree, fsdp.data_parallel_shard_degree
    if shards == -1 and processes % replicas:
        raise ConfigError(
            'parallelism.fsdp.data_parallel_replicate_degree',
            replicas,
            f'must divide the number of processes ({described_as}): each copy of the model gets as many of them.',
        )
    if shards != -1 and replicas * shards != processes:
        raise ConfigError(
            'parallelism.fsdp.data_parallel_shard_degree',
            shards,
            f'times data_parallel_replicate_degree ({replicas}) must equal the number of processes ({described_as}), '
            'or use -1 for the processes divided by the replicas.',
        )


def _check_parallelism(fsdp: Optional[FSDPOptions]) -> None:
    if fsdp is None:
        return
    replicas, shards = fsdp.data_parallel_replicate_degree, fsdp.data_parallel_shard_degree
    if replicas is not None and replicas < 1:
        raise ConfigError(
            'parallelism.fsdp.data_parallel_replicate_degree', replicas, 'expected a positive number of model copies.'
        )
    if shards != -1 and shards < 1:
        raise ConfigError(
            'parallelism.fsdp.data_parallel_shard_degree',
            shards,
            'expected a positive number of processes per copy, or -1 for the processes divided by the copies.',
        )
    if replicas is None and shards != -1:
        raise ConfigError(
            'parallelism.fsdp.data_parallel_shard_degree',
            shards,
            'applies to hybrid sharding: set data_parallel_replicate_degree too, or leave both out to shard over '
            'every process.',
        )


def recipe_from_mapping(data: Any) -> Recipe:
    """Build and validate a :class:`Recipe` from parsed YAML."""
    recipe = from_mapping(Recipe, data, '')
    validate_recipe(recipe)
    return recipe


def recipe_to_mapping(recipe: Recipe) -> dict[str, Any]:
    """Plain data (for YAML) that :func:`recipe_from_mapping` turns back into an equal recipe."""
    return dataclasses.asdict(recipe)


class _RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 loader that also reads ``5e-5`` (no dot) as a float, as YAML 1.2 and every user expects."""


_RecipeLoader.add_implicit_resolver(
    'tag:yaml.org,2002:float',
    re.compile(r'^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$'),
    list('-+0123456789'),
)


def _construct_mapping_once(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    """A mapping in which every key appears once: YAML keeps the last of repeated keys, silently."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f'key {key!r} appears twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})',
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_RecipeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_once)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_RecipeLoader)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what, in one line: `` at line 3, column 5: expected ','``."""
    mark = getattr(error, 'problem_mark', None)
    where = f' at line {mark.line + 1}, column {mark.column + 1}' if mark is not None else ''
    return f'{where}: {getattr(error, "problem", None) or str(error).splitlines()[0]}'


def _saves_sharded(recipe: Recipe) -> bool:
    fsdp = recipe.parallelism.fsdp
    return fsdp is not None and fsdp.state_dict_type == 'sharded'


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``path.to.key=value`` overrides (values parsed as YAML) to a recipe mapping, in place."""
    for override in overrides:
        path, sep, raw = override.partition('=')
        if not sep or not path:
            raise ConfigError('--set', override, 'expected path.to.key=value, e.g. optimizer.lr=1e-4.')
        node = data
        keys = path.split('.')
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise ConfigError(path, override, f'{key!r} holds {child!r}, not a mapping, so it has no sub-keys.')
            node = child
        try:
            node[keys[-1]] = _parse_yaml(raw)
        except yaml.YAMLError as error:
            raise ConfigError('--set', override, f'the value is not valid YAML{_yaml_problem(error)}.') from error
    return data


def load_recipe(path: Union[str, Path], overrides: Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides, and validate it; raise :class:`ConfigError` if invalid."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError('recipe', str(path), 'no such file.')
    try:
        data = _parse_yaml(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError('recipe', str(path), f'not valid YAML{_yaml_problem(error)}.') from error
    if data is None:
        raise ConfigError(
            'recipe', str(path), 'the file is empty; a recipe names at least its model and data (see yamls/demo.yaml).'
        )
    if not isinstance(data, Mapping):
        raise ConfigError('recipe', str(path), 'expected a YAML mapping at the top level.')
    return recipe_from_mapping(apply_overrides(dict(data), overrides))
