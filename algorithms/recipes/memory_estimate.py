"""Predict training-state bytes (parameters, gradients, optimizer state) for any model size and algorithm.

The model is built from its config on the ``meta`` device, so a 7B model costs no memory and every shape is exact;
each algorithm's own functional form (``apply_lora``, ``apply_regex_freeze``, ``freeze_layers``, HiFT's rotation
plan) then decides what trains, exactly as in a real run. Only the bytes are counted here: activations, the
framework and the allocator come on top (the benchmark measures those).

Example:
    >>> config = load_model_config('llama-7b')
    >>> rows = [estimate_training_state(config, 'full'), estimate_training_state(config, 'lora_inject', {'r': 16})]
    >>> print(format_estimates(rows))

From the command line: ``thaw estimate --model-config llama-7b --algorithm full --algorithm 'lora_inject={r: 16}'
--algorithm 'hift_rotation={group_size: 4}'``.
``--model-config`` also takes a recipe: the model its run builds (task, classes read from its data, pad token),
from the config alone (:func:`composer_thaw.recipes.building.recipe_model_spec`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional, Union, cast

import torch
from torch import nn

from composer_thaw.core.registry import algorithm_registry, build_algorithm
from composer_thaw.core.validation import ConfigError
from composer_thaw.hift_rotation import GroupQueue, plan_rotation
from composer_thaw.layer_freezing import freeze_layers
from composer_thaw.lora_inject import apply_lora
from composer_thaw.lora_inject.surgery import adapters_in_base_dtype
from composer_thaw.models.specs import BUILTIN_CONFIGS, ModelSpec, load_model_config, meta_model, spec_of
from composer_thaw.regex_freeze import apply_regex_freeze
from composer_thaw.utils.master_weights import LOW_PRECISION_DTYPES, check_master_weights
from composer_thaw.utils.parameter_selection import units_in_registration_order

__all__ = [
    'BUILTIN_CONFIGS',
    'ESTIMATED_ALGORITHMS',
    'OPTIMIZER_STATE',
    'MemoryEstimate',
    'ModelSpec',
    'estimate_training_state',
    'format_estimates',
    'load_model_config',
    'meta_model',
    'spec_of',
]

# Optimizer -> (state tensors per parameter, bytes of per-parameter scalars such as Adam's float32 ``step``).
# Models up to this many parameters have their units ordered by a traced forward (parameter_selection).
_TRACED_UP_TO = 2_000_000_000

OPTIMIZER_STATE: dict[str, tuple[int, int]] = {
    'adamw': (2, 4),
    'adam': (2, 4),
    'sgd': (1, 0),  # with momentum; plain SGD keeps no state
    'adagrad': (1, 4),
}
OptimizerName = Literal['adamw', 'adam', 'sgd', 'adagrad']

ESTIMATED_ALGORITHMS = ('full', 'layer_freezing', 'regex_freeze', 'lora_inject', 'hift_rotation')


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


def _unique_params(params) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for param in params:
        seen.setdefault(id(param), param)
    return list(seen.values())


def _shard_numel(param: torch.Tensor, world_size: int) -> int:
    """Elements of ``param`` on the rank holding the most of it when FSDP2 shards dim 0 over ``world_size`` ranks
    (``torch.chunk``: the first ranks get ``ceil(rows / world_size)`` rows)."""
    if world_size == 1 or param.ndim == 0 or param.shape[0] == 0:
        return param.numel()
    return -(-param.shape[0] // world_size) * (param.numel() // param.shape[0])


def _bytes(params, world_size: int = 1) -> int:
    return sum(_shard_numel(p, world_size) * p.element_size() for p in params)


def _state_bytes(params, optimizer: str, world_size: int = 1, fp32_state: bool = False) -> int:
    """Optimizer state of ``params``: in each parameter's dtype, or fp32 for all (``master_weights='fp32'``)."""
    tensors, scalars = OPTIMIZER_STATE[optimizer]
    return sum(
        tensors * _shard_numel(p, world_size) * (4 if fp32_state else p.element_size()) + scalars for p in params
    )


def _master_bytes(params, world_size: int = 1) -> int:
    """fp32 bytes for the low-precision tensors among ``params``: their masters (or their fp32 step gradients)."""
    return sum(4 * _shard_numel(p, world_size) for p in params if p.dtype in LOW_PRECISION_DTYPES)


def _trainable(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return _unique_params(p for group in optimizer.param_groups for p in group['params'] if p.requires_grad)


def _validate(algorithm: str, options: Mapping[str, Any]) -> None:
    """Check options the way a recipe would (unknown keys, wrong types, the algorithm's own validation)."""
    if algorithm not in ESTIMATED_ALGORITHMS:
        raise ConfigError('--algorithm', algorithm, f'not estimated; choose one of {", ".join(ESTIMATED_ALGORITHMS)}.')
    if algorithm == 'full':
        if set(options) - {'master_weights'}:
            raise ConfigError(
                '--algorithm full', dict(options), 'full fine-tuning takes no options but master_weights.'
            )
        try:
            check_master_weights(options.get('master_weights'))
        except ConfigError as error:
            raise error.under('--algorithm full') from None
        return
    if algorithm not in algorithm_registry():
        raise ConfigError('--algorithm', algorithm, 'this algorithm is not installed in this version.')
    build_algorithm(algorithm, dict(options), where='--algorithm')


def _hift_rotation(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    options: Mapping[str, Any],
    opt_name: str,
    world_size: int,
    fp32_state: bool = False,
):
    """Resident (largest group + always-trainable units) and offloaded state under HiFT's rotation, and the bytes
    moved between host and device per step (a group's state out and the next one's in at each switch). With fp32
    masters (``fp32_state``) a group's masters live and move with its optimizer state: the offloaded and moved bytes
    count them, and the parameters whose masters stay on the device come back as the last value."""
    from itertools import combinations

    if options.get('lora'):
        raise ConfigError(
            '--algorithm hift_rotation',
            dict(options),
            'lora=true is not estimated; estimate '
            'lora_inject instead (the rotation only lowers its small adapter state further).',
        )
    group_size = options.get('group_size', 1)
    plan = plan_rotation(
        model, optimizer, group_size, options.get('freeze'), options.get('always_trainable'), options.get('groups')
    )
    named = dict(model.named_parameters())
    unit_params = [_unique_params(named[n] for n in unit.parameter_names) for unit in plan.units]
    always = [p for i in plan.always for p in unit_params[i]]
    strategy = options.get('strategy', 'down2up')
    if strategy == 'random':  # any group can come up: the largest possible one bounds the resident share
        candidates = (
            combinations(plan.rotating, group_size)
            if len(plan.rotating) <= 12
            else [tuple(sorted(plan.rotating, key=lambda i: -_bytes(unit_params[i]))[:group_size])]
        )
        groups = list(candidates)
    else:  # every group the queue visits, until it comes back to its start
        queue = GroupQueue(plan.rotating, group_size, strategy)
        groups = [queue.next_group()[0] for _ in range(max(1, len(plan.rotating)) * max(1, plan.groups_per_pass))]
    largest = max(groups, key=lambda g: _bytes(p for i in g for p in unit_params[i]))
    resident = _unique_params([*always, *(p for i in largest for p in unit_params[i])])
    rotating = _unique_params(p for i in plan.rotating for p in unit_params[i])
    all_trainable = _unique_params([*always, *rotating])
    offload = options.get('offload', True)

    def moving_bytes(params) -> int:  # what leaves the device with a group: its optimizer state and its masters
        masters = _master_bytes(params, world_size) if fp32_state else 0
        return _state_bytes(params, opt_name, world_size, fp32_state) + masters

    on_device = all_trainable if not offload else resident
    resident_state = _state_bytes(on_device, opt_name, world_size, fp32_state)
    offloaded = moving_bytes(all_trainable) - moving_bytes(on_device)
    transfer = 0
    if offload and len(groups) > 1:  # each switch: the leaving group's state out, the entering group's in
        group_state = [moving_bytes([p for i in g for p in unit_params[i]]) for g in groups]
        switches = sum(group_state[k] + group_state[(k + 1) % len(groups)] for k in range(len(groups)))
        transfer = switches // (len(groups) * options.get('steps_per_group', 1))
    note = (
        f"largest group: {', '.join(plan.names(largest))}; other groups' optimizer state "
        f'{"offloaded to the host" if offload else "kept on the device"} once visited'
        f'{", with their fp32 masters" if fp32_state else ""}'
    )
    return resident, resident_state, offloaded, note, transfer, on_device


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

    * ``full``: every parameter trains.
    * ``lora_inject``, ``regex_freeze``: what the functional form leaves trainable (row-range tensors keep full-size
      state, as in a real run).
    * ``layer_freezing``: the state once ``freeze_level`` is reached (end of training); before freezing starts the
      run holds the ``full`` state.
    * ``hift_rotation``: parameters, plus gradients and optimizer state of the always-trainable units and of the
      largest group; the other groups' state is reported as offloaded (host memory).

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
    _validate(algorithm, options)
    masters = options.get('master_weights') is not None
    if masters and dtype not in (torch.bfloat16, torch.float16):
        dtype = torch.bfloat16
    algorithm_options = {k: v for k, v in options.items() if k != 'master_weights'}
    root = meta_model(spec, dtype)
    torch_optimizer = torch.optim.SGD(root.parameters(), lr=0.1)  # only its param groups are used
    note, offloaded = '', 0
    # Tracing a forward to order the units costs a pass over every weight: for billions of parameters, units follow
    # registration order (the same for the built-in decoder configs; byte totals do not depend on the order).
    large = sum(p.numel() for p in root.parameters()) > _TRACED_UP_TO
    with units_in_registration_order() if large else contextlib.nullcontext():
        try:
            if algorithm == 'lora_inject':
                apply_lora(root, torch_optimizer, **algorithm_options)
                if world_size > 1:  # sharded: adapters keep their base's dtype, as LoRAInject does under FSDP2
                    adapters_in_base_dtype(root)
            elif algorithm == 'regex_freeze':
                apply_regex_freeze(root, torch_optimizer, **algorithm_options)
            elif algorithm == 'layer_freezing':
                depth, _ = freeze_layers(
                    root,
                    torch_optimizer,
                    1.0,
                    options.get('freeze_start', 0.5),
                    options.get('freeze_level', 1.0),
                    options.get('granularity', 'leaf'),
                )
                note = f'at the end of training ({depth} units frozen); before freezing starts: the full row'
            transfer = 0
            if algorithm == 'hift_rotation':
                trainable, state_bytes, offloaded, note, transfer, mastered = _hift_rotation(
                    root, torch_optimizer, algorithm_options, optimizer, world_size, masters
                )
            else:
                trainable = mastered = _trainable(torch_optimizer)
                state_bytes = _state_bytes(trainable, optimizer, world_size, masters)
        except ConfigError:
            raise
        except ValueError as error:
            raise ConfigError(f'--algorithm {algorithm}', options, str(error)) from error
    params = _unique_params(root.parameters())
    return MemoryEstimate(
        algorithm=algorithm,
        options=options,
        total_params=sum(p.numel() for p in params),
        trainable_params=sum(p.numel() for p in trainable),
        param_bytes=_bytes(params, world_size),
        grad_bytes=_bytes(trainable, world_size),
        optimizer_state_bytes=state_bytes,
        offloaded_state_bytes=offloaded,
        note=note,
        master_bytes=_master_bytes(mastered, world_size) if masters else 0,
        step_grad_bytes=_master_bytes(trainable, world_size) // 2 if masters else 0,
        transfer_bytes_per_step=transfer,
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
