"""The order in which a model's modules run and its parameters are first used, found by tracing one forward.

Registration order (``named_parameters()``) is not execution order: OPT registers its final layer norm before its
decoder layers, an encoder-decoder registers both stacks under one parent, a ViT keeps its class token on the root
module. :func:`trace_forward` runs one forward on a tiny example input and records, for every module, when it is
first called and, for every parameter, when a torch function first reads it.

The traced forward never touches the model's weights or buffers and never talks to other ranks: every parameter is
replaced for the duration by a zero-stride zero tensor of its shape, dtype and device (a meta parameter by one on
the CPU), forward hooks (FSDP2's all-gathers, user hooks) are suspended, the model runs
in ``eval`` mode under ``no_grad``, and the random number generators are restored afterwards.

Example:
    >>> from transformers import OPTConfig, OPTForCausalLM
    >>> opt = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, word_embed_proj_dim=16, ffn_dim=32,
    ...                                num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=32))
    >>> [name for name, _ in opt.named_parameters()][2:4]  # registered before the layers
    ['model.decoder.final_layer_norm.weight', 'model.decoder.final_layer_norm.bias']
    >>> trace = trace_forward(opt)
    >>> used = sorted(trace.parameter_use, key=trace.parameter_use.get)
    >>> used[:2], used[-2:]  # run after them
    (['model.decoder.embed_tokens.weight', 'model.decoder.embed_positions.weight'],
     ['model.decoder.final_layer_norm.weight', 'model.decoder.final_layer_norm.bias'])
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ['ExampleInputs', 'ForwardTrace', 'ForwardTraceError', 'example_inputs', 'trace_forward']

ExampleInputs = tuple[tuple[Any, ...], dict[str, Any]]
"""Positional and keyword arguments of one forward call."""

# Reading a tensor's metadata is not using it (``self.weight.dtype``, ``next(self.parameters()).size(0)``);
# reading ``.T`` or ``.data`` is.
_METADATA_METHODS = frozenset(
    {'size', 'dim', 'numel', 'stride', 'element_size', 'is_floating_point', 'is_complex', 'nelement', 'data_ptr'}
)
_METADATA_ATTRIBUTES = frozenset(
    {'shape', 'dtype', 'device', 'ndim', 'requires_grad', 'is_cuda', 'is_meta', 'layout', 'grad', 'is_leaf', 'names'}
)
_HOOK_DICTS = (
    '_forward_pre_hooks',
    '_forward_pre_hooks_with_kwargs',
    '_forward_hooks',
    '_forward_hooks_with_kwargs',
    '_forward_hooks_always_called',
)


class ForwardTraceError(RuntimeError):
    """A forward of the model could not be traced (no example input could be made, or the forward raised)."""


@dataclass(frozen=True)
class ForwardTrace:
    """When each module was first called and each parameter first used, as positions in one traced forward.

    Attributes:
        module_call: first-call position of each module, under each of its paths (``''`` is the model itself);
            modules the forward never called are absent.
        module_return: position at which that first call returned.
        parameter_use: first-use position of each parameter, keyed by its canonical name (the one
            ``named_parameters()`` gives); parameters the forward never read are absent.
    """

    module_call: dict[str, int]
    module_return: dict[str, int]
    parameter_use: dict[str, int]


def _input_for(model: nn.Module, layer: nn.Module) -> ExampleInputs:
    """One input shaped for ``layer`` taken as the model's first layer."""
    if isinstance(layer, nn.Conv2d):
        size = getattr(model, 'image_size', 32)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        return (torch.zeros(1, layer.in_channels, *size),), {}
    if isinstance(layer, nn.Conv1d):
        return (torch.zeros(1, layer.in_channels, 64),), {}
    if isinstance(layer, nn.Embedding):
        return (torch.zeros(1, 4, dtype=torch.long),), {}
    assert isinstance(layer, nn.Linear)
    return (torch.zeros(1, layer.in_features),), {}


def example_inputs(model: nn.Module) -> list[ExampleInputs]:
    """Tiny inputs for one forward of ``model``, the likeliest first, on the CPU (:func:`trace_forward` moves them
    to the model's device and uses the first that runs).

    A Hugging Face model gets its own ``dummy_inputs`` (token ids, and decoder ids for T5) or, for an image model,
    one image of its configured size. Any other model gets one input per kind of first layer it may have, in the
    order the kinds' first layers are registered: an image for a ``Conv2d`` (32x32, or the ``image_size`` the model
    declares, as torchvision's ViT does), 4 token ids for an ``Embedding``, a vector for a ``Linear``.

    Raises:
        ForwardTraceError: if no input can be derived.
    """
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency of Composer's NLP models
        PreTrainedModel = ()  # type: ignore[assignment,misc]
    if isinstance(model, PreTrainedModel):
        config = model.config
        name = getattr(model, 'main_input_name', 'input_ids')
        if name == 'input_ids':
            dummy_inputs: Any = model.dummy_inputs  # a dict of tensors (untyped before transformers 4.53)
            inputs = {key: value.clone() for key, value in dummy_inputs.items()}
            vocab = getattr(config, 'vocab_size', None)
            for key, value in inputs.items():
                if key.endswith('input_ids') and isinstance(vocab, int) and vocab > 0:
                    inputs[key] = value % vocab
            return [((), inputs)]
        if name == 'pixel_values':
            vision = getattr(config, 'vision_config', config)
            size = getattr(vision, 'image_size', 32)
            size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
            return [((), {name: torch.zeros(1, getattr(vision, 'num_channels', 3), *size)})]
        raise ForwardTraceError(f'no example input for a Hugging Face model whose main input is {name!r}')
    firsts: dict[type, nn.Module] = {}
    for module in model.modules():
        kind = next((k for k in (nn.Conv2d, nn.Conv1d, nn.Embedding, nn.Linear) if isinstance(module, k)), None)
        if kind is not None:
            firsts.setdefault(kind, module)
    if not firsts:
        raise ForwardTraceError(
            f'cannot guess an input for {type(model).__name__}: it has no Conv2d, Conv1d, Embedding or Linear layer'
        )
    return [_input_for(model, layer) for layer in firsts.values()]


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _reads_metadata(func: Callable) -> bool:
    name = getattr(func, '__name__', '')
    if name == '__get__':
        return getattr(getattr(func, '__self__', None), '__name__', '') in _METADATA_ATTRIBUTES
    return name in _METADATA_METHODS


class _FirstUse(TorchFunctionMode):
    """Records the first torch function that reads each watched tensor, while ``active``."""

    def __init__(self, watched: dict[int, str]):
        super().__init__()
        self.watched = watched
        self.position = 0
        self.active = False
        self.first_use: dict[str, int] = {}

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if self.active and not _reads_metadata(func):
            self.position += 1
            for tensor in _tensors((args, kwargs)):
                name = self.watched.get(id(tensor))
                if name is not None:
                    self.first_use.setdefault(name, self.position)
        return func(*args, **kwargs)


@contextmanager
def _hooks_suspended(model: nn.Module) -> Iterator[None]:
    """Empty every module's forward hooks (FSDP2's all-gathers among them) for the duration, then restore them."""
    saved = []
    for module in model.modules():
        saved.append((module, [getattr(module, key, None) for key in _HOOK_DICTS]))
        for key in _HOOK_DICTS:
            if hasattr(module, key):
                setattr(module, key, OrderedDict())
    try:
        yield
    finally:
        for module, dicts in saved:
            for key, value in zip(_HOOK_DICTS, dicts):
                if value is not None:
                    setattr(module, key, value)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _stand_in(tensor: torch.Tensor) -> torch.Tensor:
    """A zero tensor of ``tensor``'s (global) shape, dtype and device that holds one element."""
    device = torch.device('cpu') if tensor.device.type == 'meta' else tensor.device
    return torch.zeros((), dtype=tensor.dtype, device=device).expand(tensor.shape)


@contextmanager
def _stand_in_weights(model: nn.Module) -> Iterator[dict[int, str]]:
    """Put a stand-in in place of every parameter (and meta buffer) for the duration; yield stand-in id -> name.

    Tied parameters get one stand-in, so they stay tied. (``torch.func.functional_call`` is not used: on exit it
    unties a weight shared between a module reached under two names and a third module, as in T5.)
    """
    canonical = {id(param): name for name, param in model.named_parameters()}
    stand_ins: dict[int, torch.Tensor] = {}
    swapped: list[tuple[dict[str, Any], str, torch.Tensor]] = []
    for module in model.modules():
        slot_dicts: tuple[tuple[dict[str, Any], bool], ...] = ((module._parameters, False), (module._buffers, True))
        for slots, only_meta in slot_dicts:
            for key, tensor in list(slots.items()):
                if tensor is None or (only_meta and tensor.device.type != 'meta'):
                    continue
                if id(tensor) not in stand_ins:
                    stand_ins[id(tensor)] = _stand_in(tensor)
                swapped.append((slots, key, tensor))
                slots[key] = stand_ins[id(tensor)]
    try:
        yield {id(stand_ins[key]): name for key, name in canonical.items()}
    finally:
        for slots, key, tensor in reversed(swapped):
            slots[key] = tensor


def _to(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (list, tuple)):
        return type(value)(_to(item, device) for item in value)
    if isinstance(value, dict):
        return {key: _to(item, device) for key, item in value.items()}
    return value


def trace_forward(model: nn.Module, inputs: Optional[ExampleInputs] = None) -> ForwardTrace:
    """Run one forward of ``model`` on stand-in weights and record when modules run and parameters are first used.

    Args:
        model: the user's model (:func:`composer_thaw.utils.parameter_selection.user_module` of a Composer model).
        inputs: ``(args, kwargs)`` of the forward; by default the first of :func:`example_inputs` that runs.

    Raises:
        ForwardTraceError: no input could be made, or the forward raised on each (the error says why, for the
            likeliest input).
    """
    candidates = example_inputs(model) if inputs is None else [inputs]
    first = next(model.parameters(), None)
    device = torch.device('cpu') if first is None or first.device.type == 'meta' else first.device
    failure: Optional[ForwardTraceError] = None
    for candidate in candidates:
        try:
            return _trace(model, _to(candidate, device), device)
        except ForwardTraceError as error:
            failure = failure or error
    assert failure is not None
    raise failure


def _trace(model: nn.Module, inputs: ExampleInputs, device: torch.device) -> ForwardTrace:
    args, kwargs = inputs
    module_call: dict[int, int] = {}
    module_return: dict[int, int] = {}
    devices = [device] if device.type == 'cuda' else []
    try:
        with _hooks_suspended(model), _eval_mode(model), torch.random.fork_rng(devices=devices), torch.no_grad():
            with _stand_in_weights(model) as watched:
                recorder = _FirstUse(watched)

                def on_call(module: nn.Module, _args: Any) -> None:  # every event gets a position of its own
                    recorder.position += 1
                    module_call.setdefault(id(module), recorder.position)
                    if module is model:
                        recorder.active = True

                def on_return(module: nn.Module, _args: Any, _output: Any) -> None:
                    recorder.position += 1
                    module_return.setdefault(id(module), recorder.position)
                    if module is model:
                        recorder.active = False

                for module in model.modules():
                    module.register_forward_pre_hook(on_call)
                    module.register_forward_hook(on_return, always_call=True)
                with recorder:
                    model(*args, **kwargs)
    except Exception as error:  # the model's own code failed on the example input: report, never crash
        first_line = (str(error).strip().splitlines() or [''])[0][:300]
        raise ForwardTraceError(f'{type(error).__name__}: {first_line}') from error
    paths = list(model.named_modules(remove_duplicate=False))
    return ForwardTrace(
        {path: module_call[id(module)] for path, module in paths if id(module) in module_call},
        {path: module_return[id(module)] for path, module in paths if id(module) in module_return},
        recorder.first_use,
    )
