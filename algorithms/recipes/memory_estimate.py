"""Predict training-state bytes (parameters, gradients, optimizer state) for any model size and algorithm.

The model is built from its config on the ``meta`` device, so a 7B model costs no memory and every shape is exact;
each algorithm's own functional form (``apply_lora``, ``apply_regex_freeze``, ``freeze_layers``, HiFT's rotation
plan) then decides what trains, exactly as in a real run. Only the bytes are counted here: activations, the
framework and the allocator come on top (the benchmark measures those).

Example:
    >>> from composer_thaw.models.specs import load_model_config
    >>> config = load_model_config('llama-7b')
    >>> rows = [estimate_training_state(config, 'full'), estimate_training_state(config, 'lora_inject', {'r': 16})]
    >>> print(format_estimates(rows))  # a Markdown table; its last columns (offload, notes) are left out here
    | algorithm | trainable params | params | grads | optimizer state | fp32 masters + step grads | training state | ...
    |---|---|---|---|---|---|---|---|---|---|---|
    | full | 6,738,415,616 (100.00%) | 25.10 GiB | 25.10 GiB | 50.21 GiB | - | 100.41 GiB | 1.000x | ...
    | lora_inject(r=16) | 8,388,608 (0.12%) | 25.13 GiB | 32.00 MiB | 64.00 MiB | - | 25.23 GiB | 0.251x | ...

From the command line: ``thaw estimate --model-config llama-7b --algorithm full --algorithm 'lora_inject={r: 16}'
--algorithm 'hift_rotation={group_size: 4}'``.
``--model-config`` also takes a recipe: the model its run builds (task, classes read from its data, pad token),
from the config alone (:func:`composer_thaw.recipes.building.recipe_model_spec`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union, cast

import torch
from composer.core import Algorithm

from composer_thaw.core.registry import algorithm_module, algorithm_registry, build_algorithm
from composer_thaw.core.validation import ConfigError
from composer_thaw.models.specs import BUILTIN_CONFIGS, ModelSpec, load_model_config, meta_model, spec_of
from composer_thaw.utils.master_weights import check_master_weights
from composer_thaw.utils.memory import (
    OPTIMIZER_STATE,
    EstimateSettings,
    MemoryPlan,
    OptimizerName,
    master_bytes,
    resident_plan,
    tensor_bytes,
    unique_params,
)
from composer_thaw.utils.parameter_selection import units_in_registration_order

__all__ = [
    'BUILTIN_CONFIGS',
    'OPTIMIZER_STATE',
    'MemoryEstimate',
    'ModelSpec',
    'estimate_training_state',
    'estimated_algorithms',
    'format_estimates',
    'load_model_config',
    'meta_model',
    'spec_of',
]

# Models up to this many parameters have their units ordered by a traced forward (parameter_selection).
_TRACED_UP_TO = 2_000_000_000


@dataclass(frozen=True)
class MemoryEstimate:
    """Predicted bytes on the training device, plus optimizer state held elsewhere (HiFT's offloaded state).

    With ``master_weights='fp32'`` (:mod:`composer_thaw.utils.master_weights`) ``master_bytes`` are the fp32 master
    copies
    of the low-precision tensors that train, and ``step_grad_bytes`` what their gradients grow by during the
    optimizer step (each becomes an fp32 copy, the low-precision one released: 2 bytes per bf16 element).
    ``transfer_bytes_per_step`` is what moves between host and device per optimizer step, averaged over a rotation
    (HiFT's offloaded state going out and coming back in).
    """

    algorithm: str
    options: dict[str, Any]
    total_params: int
    trainable_params: int
    param_bytes: int
    grad_bytes: int
    optimizer_state_bytes: int
    offloaded_state_bytes: int = 0
    note: str = ''
    master_bytes: int = 0
    step_grad_bytes: int = 0
    transfer_bytes_per_step: int = 0

    @property
    def training_state_bytes(self) -> int:
        """The peak: parameters, gradients, optimizer state, masters and the step's fp32 gradients."""
        return (
            self.param_bytes + self.grad_bytes + self.optimizer_state_bytes + self.master_bytes + self.step_grad_bytes
        )


def _estimator(name: str) -> Optional[Callable[..., MemoryPlan]]:
    """The ``estimate_memory`` an algorithm declares next to its class (as it declares its ``EXAMPLES``)."""
    try:
        return getattr(algorithm_module(name), 'estimate_memory', None)
    except ImportError:  # a third party's broken entry point: not estimated
        return None


def estimated_algorithms() -> list[str]:
    """``full`` and every registered algorithm that declares ``estimate_memory`` (ours and third parties')."""
    return ['full', *(name for name in sorted(algorithm_registry()) if _estimator(name) is not None)]


def _validate(algorithm: str, options: Mapping[str, Any]) -> Optional[Algorithm]:
    """Check options the way a recipe would (unknown keys, wrong types, the algorithm's own validation); the built
    algorithm (``None`` for ``full``)."""
    if algorithm == 'full':
        if set(options) - {'master_weights'}:
            raise ConfigError(
                '--algorithm full', dict(options), 'full fine-tuning takes no options but master_weights.'
            )
        try:
            check_master_weights(options.get('master_weights'))
        except ConfigError as error:
            raise error.under('--algorithm full') from None
        return None
    if algorithm not in algorithm_registry() or _estimator(algorithm) is None:
        raise ConfigError(
            '--algorithm', algorithm, f'not estimated; choose one of {", ".join(estimated_algorithms())}.'
        )
    return build_algorithm(algorithm, dict(options), where='--algorithm')


def _optimizer_name(optimizer: str) -> OptimizerName:
    """``optimizer``, checked to be one :data:`OPTIMIZER_STATE` knows."""
    if optimizer not in OPTIMIZER_STATE:
        raise ConfigError('--optimizer', optimizer, f'choose one of {", ".join(OPTIMIZER_STATE)}.')
    return cast(OptimizerName, optimizer)


def estimate_training_state(
    model: Union[ModelSpec, str, Mapping[str, Any]],
    algorithm: str = 'full',
    options: Optional[Mapping[str, Any]] = None,
    optimizer: OptimizerName = 'adamw',
    dtype: torch.dtype = torch.float32,
    world_size: int = 1,
) -> MemoryEstimate:
    """Predicted peak training-state bytes of ``algorithm`` (with ``options``) on ``model``, per process.

    With ``world_size`` > 1 the model is sharded by FSDP2 over that many processes: each tensor's parameters,
    gradients and optimizer state split on dim 0, and the figures are those of the rank holding the largest shards.
    DDP (replicated) costs what ``world_size=1`` predicts on every process.

    ``full``: every parameter trains. Any other algorithm is built from ``options`` (checked as a recipe's) and its
    own ``estimate_memory`` (declared next to its class, :mod:`composer_thaw.utils.memory`) applies its functional
    form to the meta model and says what stays on the device: what ``lora_inject`` and ``regex_freeze`` leave
    trainable (row-range tensors keep full-size state, as in a real run); ``layer_freezing``'s state once
    ``freeze_level`` is reached; ``hift_rotation``'s always-trainable units and largest group, with the other groups'
    state (and masters) offloaded to host memory.

    ``options`` may hold ``master_weights: 'fp32'`` (for ``full`` too): the weights are low precision (``dtype``, or
    bf16 when ``dtype`` is fp32), the tensors that train get fp32 masters, fp32 optimizer state and, during the step,
    fp32 copies of their gradients.

    Raises:
        ConfigError: an unknown algorithm or optimizer, or options the algorithm rejects for this model.
    """
    options = dict(options or {})
    spec = model if isinstance(model, ModelSpec) else load_model_config(model)
    optimizer = _optimizer_name(optimizer)
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ConfigError('--world-size', world_size, 'expected a whole number of processes, at least 1.')
    built = _validate(algorithm, options)
    masters = options.get('master_weights') is not None
    if masters and dtype not in (torch.bfloat16, torch.float16):
        dtype = torch.bfloat16
    settings = EstimateSettings(optimizer, world_size, fp32_state=masters)
    root = meta_model(spec, dtype)
    torch_optimizer = torch.optim.SGD(root.parameters(), lr=0.1)  # only its param groups are used
    # Tracing a forward to order the units costs a pass over every weight: for billions of parameters, units follow
    # registration order (the same for the built-in decoder configs; byte totals do not depend on the order).
    large = sum(p.numel() for p in root.parameters()) > _TRACED_UP_TO
    with units_in_registration_order() if large else contextlib.nullcontext():
        try:
            if built is None:
                plan = resident_plan(torch_optimizer, settings)
            else:
                estimator = _estimator(algorithm)
                assert estimator is not None  # _validate
                plan = estimator(root, torch_optimizer, built, settings)
        except ConfigError:
            raise
        except ValueError as error:
            raise ConfigError(f'--algorithm {algorithm}', options, str(error)) from error
    params = unique_params(root.parameters())
    mastered = plan.trainable if plan.mastered is None else plan.mastered
    return MemoryEstimate(
        algorithm=algorithm,
        options=options,
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in plan.trainable),
        param_bytes=tensor_bytes(params, world_size),
        grad_bytes=tensor_bytes(plan.trainable, world_size),
        optimizer_state_bytes=plan.optimizer_state_bytes,
        offloaded_state_bytes=plan.offloaded_state_bytes,
        note=plan.note,
        master_bytes=master_bytes(mastered, world_size) if masters else 0,
        step_grad_bytes=master_bytes(plan.trainable, world_size) // 2 if masters else 0,
        transfer_bytes_per_step=plan.transfer_bytes_per_step,
    )


def _human(n: float) -> str:
    for unit in ('B', 'KiB', 'MiB', 'GiB'):
        if abs(n) < 1024 or unit == 'GiB':
            return f'{int(n)} B' if unit == 'B' else f'{n:.2f} {unit}'
        n /= 1024
    return f'{n:.2f} GiB'


def _masters_cell(row: MemoryEstimate) -> str:
    if not row.master_bytes and not row.step_grad_bytes:
        return '-'
    return f'{_human(row.master_bytes)} + {_human(row.step_grad_bytes)}'


def format_estimates(rows: list[MemoryEstimate], title: str = '') -> str:
    """A Markdown table of estimates, with each row's total relative to the first row."""
    lines = [title, ''] if title else []
    lines += [
        '| algorithm | trainable params | params | grads | optimizer state | fp32 masters + step grads '
        '| training state | vs first | offloaded | host<->device per step | note |',
        '|---|---|---|---|---|---|---|---|---|---|---|',
    ]
    reference = rows[0].training_state_bytes if rows else 1
    for row in rows:
        options = ', '.join(f'{k}={v!r}' for k, v in row.options.items())
        label = f'{row.algorithm}({options})' if options else row.algorithm
        lines.append(
            f'| {label} | {row.trainable_params:,} ({row.trainable_params / max(row.total_params, 1):.2%}) | '
            f'{_human(row.param_bytes)} | {_human(row.grad_bytes)} | {_human(row.optimizer_state_bytes)} | '
            f'{_masters_cell(row)} | {_human(row.training_state_bytes)} | '
            f'{row.training_state_bytes / reference:.3f}x | '
            f'{_human(row.offloaded_state_bytes) if row.offloaded_state_bytes else "-"} | '
            f'{_human(row.transfer_bytes_per_step) if row.transfer_bytes_per_step else "-"} | {row.note} |'
        )
    return '\n'.join(lines)


def parse_algorithm(text: str) -> tuple[str, dict[str, Any]]:
    """``'lora_inject={r: 16}'`` -> ``('lora_inject', {'r': 16})``; a bare name has no options."""
    import yaml

    name, _, options = text.partition('=')
    name = name.strip()
    if not options.strip():
        return name, {}
    try:
        value = yaml.safe_load(options)
    except yaml.YAMLError as error:
        raise ConfigError('--algorithm', text, f'the options after "=" are not valid YAML: {error}.') from error
    if not isinstance(value, dict):
        raise ConfigError('--algorithm', text, "expected NAME or NAME={key: value, ...}, e.g. 'lora_inject={r: 16}'.")
    return name, value


def _parse_override(text: str) -> tuple[str, Any]:
    import yaml

    key, sep, value = text.partition('=')
    if not sep or not key.strip():
        raise ConfigError('--set', text, 'expected KEY=VALUE, e.g. num_hidden_layers=8.')
    return key.strip(), yaml.safe_load(value)


_DTYPES = {'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}


def estimate_report(
    model_config: str,
    algorithms: list[str],
    overrides: Sequence[str] = (),
    optimizer: str = 'adamw',
    dtype: str = 'float32',
    world_size: int = 1,
) -> str:
    """The ``thaw estimate`` table: one row per ``NAME[={options}]`` in ``algorithms`` (``full`` if none)."""
    if dtype not in _DTYPES:
        raise ConfigError('--dtype', dtype, f'choose one of {", ".join(_DTYPES)}.')
    changes = dict(_parse_override(o) for o in overrides)
    if model_config.endswith(('.yaml', '.yml')):  # a recipe: the model its run builds
        # deferred: building a recipe's model loads Composer's Trainer stack, which a named config never needs
        from composer_thaw.recipes.building import recipe_model_spec
        from composer_thaw.recipes.schema import load_recipe

        spec = recipe_model_spec(load_recipe(model_config))
        for key, value in changes.items():
            setattr(spec.config, key, value)
    else:
        spec = load_model_config(model_config, changes)
    rows = [
        estimate_training_state(spec, name, options, _optimizer_name(optimizer), _DTYPES[dtype], world_size)
        for name, options in map(parse_algorithm, algorithms or ['full'])
    ]
    where = (
        'on the training device' if world_size == 1 else f'per process, sharded by FSDP2 over {world_size} processes'
    )
    title = (
        f'{spec.name} ({spec.config.model_type}, {rows[0].total_params:,} parameters), {optimizer}, {dtype}: '
        f'predicted training-state bytes {where} (activations not included)'
    )
    return format_estimates(rows, title)
