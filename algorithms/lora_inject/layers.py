"""Adapter layers: a frozen base module plus a trainable low-rank update ``scaling * B @ A``.

Each layer keeps the module it adapts as ``base_layer`` (so the base weight is ``<name>.base_layer.weight``, as in
PEFT) and adds ``lora_A`` / ``lora_B`` (and ``lora_magnitude`` for DoRA) as parameters of its own. One adapter per
layer: there are no adapter names.

================  ===================================  ====================================
layer             ``lora_A``                           ``lora_B``
================  ===================================  ====================================
``LoRALinear``    ``(r, in_features)``                 ``(out_features, r)``
``LoRAEmbedding`` ``(r, num_embeddings)``              ``(embedding_dim, r)``
``LoRAConv``      ``(r, in_channels, *kernel_size)``   ``(out_channels, r, 1, ...)``
================  ===================================  ====================================

``LoRALinear`` also adapts Hugging Face's GPT-2 ``Conv1D`` (weight stored ``(in, out)``, "fan_in_fan_out") and,
with ``enabled_slices``, fused projections per slice (loralib's ``MergedLinear``): the output features are split into
equal slices and slice ``i`` of an enabled set has its own ``A_i``, ``B_i`` (stacked in ``lora_A``, ``lora_B``).

``merge()`` folds the update into the base weight (the forward pass is then the base module's alone); ``unmerge()``
takes it out again, exact up to the rounding of the weight's dtype.

Why one module: the adapter layers (linear, embedding, GPT-2 ``Conv1D``, DoRA) share one base with merge,
unmerge and the initializations; each type is a few lines on top of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from composer_thaw.utils.sharding import shard_like

__all__ = [
    'LoRAConv',
    'LoRAEmbedding',
    'LoRALayer',
    'LoRALinear',
    'adapter_class_for',
    'is_conv1d_transposed',
    'is_quantized',
]


def is_conv1d_transposed(module: nn.Module) -> bool:
    """Whether ``module`` is Hugging Face's ``Conv1D`` (a linear layer whose weight is stored ``(in, out)``)."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(module, Conv1D)


def is_quantized(module: nn.Module) -> bool:
    """Whether ``module``'s weight is stored quantized (bitsandbytes 4/8-bit): it can be adapted, not merged."""
    weight = getattr(module, 'weight', None)
    return weight is not None and (
        not weight.dtype.is_floating_point or type(module).__name__ in ('Linear4bit', 'Linear8bitLt')
    )


def _weight_of(module: nn.Module) -> torch.Tensor:
    """``module.weight`` (torch types the attributes of a module as ``Tensor | Module``)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f'{type(module).__name__}.weight is a {type(weight).__name__}, not a tensor.')
    return weight


def _adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    # Adapters train in float32 when the base is half precision or quantized (as PEFT's autocast_adapter_dtype).
    if weight.dtype in (torch.float16, torch.bfloat16) or not weight.dtype.is_floating_point:
        return torch.float32
    return weight.dtype


class LoRALayer(nn.Module):
    """What every adapter layer shares: the base module, rank, scaling, dropout, DoRA magnitude, merge state.

    Attribute lookups the layer cannot answer go to ``base_layer`` (``in_features``, ``weight``, ``padding_idx``...), so
    model code that inspects the wrapped module keeps working.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
    ):
        super().__init__()
        if r <= 0:
            raise ValueError(f'r={r!r} is invalid: the rank must be a positive integer.')
        self.base_layer = base_layer
        self.r = r
        self.lora_alpha = lora_alpha
        self.use_rslora = use_rslora
        self.use_dora = use_dora
        self.scaling = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.merged = False
        self._merge_factor: Optional[torch.Tensor] = None  # DoRA: the scale applied at merge time, for unmerge
        self._plain_load_prefix: Optional[str] = None  # set while a state dict written without LoRA loads
        self.register_load_state_dict_pre_hook(_map_plain_base_keys)
        self.register_load_state_dict_post_hook(_finish_plain_load)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == 'base_layer':
                raise
            return getattr(self.base_layer, name)

    # ---- what a subclass defines -------------------------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``scaling * B @ A`` in the base weight's layout and shape."""
        raise NotImplementedError

    def _column_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """DoRA: the norm of each output channel of ``weight`` (base layout), in ``lora_magnitude``'s shape."""
        raise NotImplementedError

    def _as_weight_factor(self, factor: torch.Tensor) -> torch.Tensor:
        """DoRA: a per-channel factor in ``lora_magnitude``'s shape, reshaped to broadcast over the base weight."""
        raise NotImplementedError

    # ---- shared ----------------------------------------------------------------------------------------------
    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable tensors of this adapter, by attribute name."""
        names = ('lora_A', 'lora_B', 'lora_magnitude') if self.use_dora else ('lora_A', 'lora_B')
        return {name: getattr(self, name) for name in names}

    @torch.no_grad()
    def _magnitude_of_weight(self) -> torch.Tensor:
        """DoRA's initial magnitude: the channel norms of the base weight with the adapter's update added."""
        weight = _weight_of(self.base_layer).detach().to(self.lora_A.dtype)
        return self._column_norm(weight + self.delta_weight().to(weight.dtype))

    def _init_magnitude(self) -> None:
        self.lora_magnitude = nn.Parameter(self._magnitude_of_weight())

    @torch.no_grad()
    def adopt_loaded_base(self) -> None:
        """Re-derive what depends on the base weight after weights written without LoRA were loaded into it.

        The adapters keep their values (at initialisation: the update is zero) and the layer computes what the
        loaded base computes: a merged layer counts as unmerged (the loaded weight has no update in it), DoRA's
        magnitude becomes the loaded weight's channel norms, PiSSA is computed again from the loaded weight.
        """
        self.merged, self._merge_factor = False, None
        if self.use_dora:
            self.lora_magnitude.copy_(self._magnitude_of_weight())

    def _dora_scale(self) -> torch.Tensor:
        """``m / ||W + scaling * B A||`` per channel, the norm treated as a constant (DoRA paper, section 4.3)."""
        weight = _weight_of(self.base_layer).to(self.lora_A.dtype)
        norm = self._column_norm(weight + self.delta_weight().detach()).detach()
        return self.lora_magnitude / norm

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """A new tensor: the base weight with the adapter folded in (the layer itself is not changed)."""
        if is_quantized(self.base_layer):
            raise NotImplementedError(
                f'Cannot merge into the quantized {type(self.base_layer).__name__}: dequantize the base first.'
            )
        weight = _weight_of(self.base_layer)
        delta = self.delta_weight().to(weight.dtype)
        if not self.use_dora:
            return weight + delta
        factor = self._as_weight_factor(self.lora_magnitude / self._column_norm(weight + delta)).to(weight.dtype)
        return factor * (weight + delta)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight. Merging a merged layer does nothing."""
        if self.merged:
            return
        weight = _weight_of(self.base_layer)
        merged = self.merged_weight()
        if self.use_dora:
            delta = self.delta_weight().to(weight.dtype)
            self._merge_factor = self._as_weight_factor(self.lora_magnitude / self._column_norm(weight + delta)).to(
                weight.dtype
            )
        weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the adapter out of the base weight again. Unmerging an unmerged layer does nothing."""
        if not self.merged:
            return
        weight = _weight_of(self.base_layer)
        delta = self.delta_weight().to(weight.dtype)
        if self.use_dora:
            assert self._merge_factor is not None  # merge() set it
            weight.copy_(weight / self._merge_factor - delta)
            self._merge_factor = None
        else:
            weight.sub_(delta)
        self.merged = False

    def extra_repr(self) -> str:
        extras = [f'r={self.r}', f'lora_alpha={self.lora_alpha}', f'scaling={self.scaling:.4g}']
        if self.use_dora:
            extras.append('dora=True')
        if self.merged:
            extras.append('merged=True')
        return ', '.join(extras)


class LoRALinear(LoRALayer):
    """LoRA on ``nn.Linear`` or Hugging Face ``Conv1D``, optionally per slice of a fused projection."""

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = 'kaiming',
        enabled_slices: Optional[Sequence[bool]] = None,
    ):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, use_dora)
        self.fan_in_fan_out = is_conv1d_transposed(base_layer)
        weight = _weight_of(base_layer)
        if self.fan_in_fan_out:
            in_features, out_features = weight.shape
        else:
            # int attributes of the base (nn.Linear, a quantized linear); torch's stubs type them Tensor | Module
            in_features, out_features = base_layer.in_features, base_layer.out_features  # type: ignore[assignment]
        self.enabled_slices = tuple(enabled_slices) if enabled_slices is not None else None
        if self.enabled_slices is not None:
            if out_features % len(self.enabled_slices):
                raise ValueError(
                    f'enabled_slices={list(self.enabled_slices)} splits {out_features} output features into '
                    f'{len(self.enabled_slices)} slices, which does not divide evenly.'
                )
            self.slice_size = out_features // len(self.enabled_slices)
            enabled = sum(self.enabled_slices)
            a_shape, b_shape = (enabled * r, in_features), (enabled * self.slice_size, r)
        else:
            a_shape, b_shape = (r, in_features), (out_features, r)
        device, dtype = weight.device, _adapter_dtype(weight)
        self.lora_A = nn.Parameter(torch.empty(a_shape, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, device=device, dtype=dtype))
        if init == 'kaiming':
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif init == 'gaussian':
            nn.init.normal_(self.lora_A, std=1 / r)
        elif init == 'pissa':
            self._pissa_init()
        else:
            raise ValueError(f"init={init!r} is invalid: choose 'kaiming', 'gaussian' or 'pissa'.")
        if use_dora:
            self._init_magnitude()

    def _weight_out_in(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.fan_in_fan_out else weight

    @property
    def is_pissa(self) -> bool:
        return 'pissa_initial_A' in self._buffers

    @torch.no_grad()
    def _pissa_init(self) -> None:
        """A, B from the top-r singular triplets of W; W keeps the residual, so the output is unchanged."""
        weight = _weight_of(self.base_layer)
        full = self._weight_out_in(weight.to(torch.float32))
        u, s, vh = torch.linalg.svd(full, full_matrices=False)
        root = torch.sqrt(s[: self.r] / self.scaling)
        self.lora_A.copy_(root[:, None] * vh[: self.r])
        self.lora_B.copy_(u[:, : self.r] * root[None, :])
        residual = full - self.scaling * self.lora_B.to(torch.float32) @ self.lora_A.to(torch.float32)
        weight.copy_(self._weight_out_in(residual).to(weight.dtype))
        # Kept so the trained adapter can be rewritten for the original (unmodified) base: see peft_format.py.
        if self.is_pissa:
            self.pissa_initial_A.copy_(self.lora_A)
            self.pissa_initial_B.copy_(self.lora_B)
        else:
            self.register_buffer('pissa_initial_A', self.lora_A.detach().clone())
            self.register_buffer('pissa_initial_B', self.lora_B.detach().clone())

    @torch.no_grad()
    def adopt_loaded_base(self) -> None:
        """As :meth:`LoRALayer.adopt_loaded_base`; with PiSSA, A, B and the residual are computed from the loaded
        weight (the principal directions of the weights being fine-tuned, not of those the model was built with)."""
        self.merged, self._merge_factor = False, None
        if self.is_pissa:
            self._pissa_init()
        super().adopt_loaded_base()

    def _slice_updates(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """The per-slice outputs ``B_i (A_i x)`` of enabled slices from ``hidden = A x`` (all slices' A stacked)."""
        hiddens = hidden.split(self.r, dim=-1)
        weights = self.lora_B.split(self.slice_size, dim=0)
        return [F.linear(h, b) for h, b in zip(hiddens, weights)]

    def delta_weight(self) -> torch.Tensor:
        if self.enabled_slices is None:
            delta = self.lora_B @ self.lora_A
        else:
            parts = iter(b @ a for a, b in zip(self.lora_A.split(self.r), self.lora_B.split(self.slice_size)))
            rows = [
                next(parts) if on else self.lora_A.new_zeros(self.slice_size, self.lora_A.shape[1])
                for on in self.enabled_slices
            ]
            delta = torch.cat(rows, dim=0)
        return self._weight_out_in(delta) * self.scaling

    def _column_norm(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(self._weight_out_in(weight), dim=1)

    def _as_weight_factor(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.view(1, -1) if self.fan_in_fan_out else factor.view(-1, 1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        lora_A, lora_B = self.lora_A, self.lora_B
        x = x.to(lora_A.dtype)
        dropped = self.lora_dropout(x)
        hidden = F.linear(dropped, lora_A)
        if self.enabled_slices is not None:
            updates = iter(self._slice_updates(hidden * self.scaling))
            shape = (*hidden.shape[:-1], self.slice_size)
            update = torch.cat([next(updates) if on else hidden.new_zeros(shape) for on in self.enabled_slices], -1)
            return result + update.to(result.dtype)
        if not self.use_dora:  # scale the rank-r hidden, not the wider output
            return result + F.linear(hidden * self.scaling, lora_B).to(result.dtype)
        update = F.linear(hidden, lora_B)
        scale = self._dora_scale()
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = getattr(self.base_layer, 'bias', None)
            base = result if bias is None else result - bias
        else:
            base = F.linear(dropped, self._weight_out_in(_weight_of(self.base_layer)).to(dropped.dtype))
        return result + ((scale - 1) * base + scale * update * self.scaling).to(result.dtype)


class LoRAEmbedding(LoRALayer):
    """LoRA on ``nn.Embedding``: A starts at zero (one column per token), B normal, as in loralib and PEFT."""

    base_layer: nn.Embedding

    def __init__(
        self,
        base_layer: nn.Embedding,
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = 'kaiming',
    ):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, use_dora)
        if init == 'pissa':
            raise ValueError("init='pissa' is supported for linear layers only, not for nn.Embedding.")
        weight = base_layer.weight
        device, dtype = weight.device, _adapter_dtype(weight)
        self.lora_A = nn.Parameter(torch.zeros(r, base_layer.num_embeddings, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.randn(base_layer.embedding_dim, r, device=device, dtype=dtype))
        if use_dora:
            self._init_magnitude()

    def delta_weight(self) -> torch.Tensor:
        return (self.lora_B @ self.lora_A).T * self.scaling

    def _column_norm(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.linalg.norm(weight, dim=0)

    def _as_weight_factor(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.view(1, -1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        base = self.base_layer
        hidden = F.embedding(x, self.lora_A.T, padding_idx=base.padding_idx, scale_grad_by_freq=base.scale_grad_by_freq)
        update = (hidden * self.scaling) @ self.lora_B.T
        if not self.use_dora:
            return result + update.to(result.dtype)
        scale = self._dora_scale()
        return (scale * result + scale * update).to(result.dtype)


class LoRAConv(LoRALayer):
    """LoRA on ``nn.Conv1d`` / ``nn.Conv2d``: A is a convolution like the base's with ``r`` output channels, B a
    1x1 convolution from ``r`` channels to the base's output channels."""

    base_layer: Union[nn.Conv1d, nn.Conv2d]

    def __init__(
        self,
        base_layer: Union[nn.Conv1d, nn.Conv2d],
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        use_rslora: bool = False,
        use_dora: bool = False,
        init: str = 'kaiming',
    ):
        super().__init__(base_layer, r, lora_alpha, lora_dropout, use_rslora, use_dora)
        if init == 'pissa':
            raise ValueError(f"init='pissa' is supported for linear layers only, not for {type(base_layer).__name__}.")
        if base_layer.groups != 1 or base_layer.padding_mode != 'zeros':
            raise ValueError(
                f'{type(base_layer).__name__} with groups={base_layer.groups}, padding_mode='
                f"{base_layer.padding_mode!r} is not supported: LoRA needs groups=1 and padding_mode='zeros'."
            )
        self._conv = F.conv1d if isinstance(base_layer, nn.Conv1d) else F.conv2d
        weight = base_layer.weight
        device, dtype = weight.device, _adapter_dtype(weight)
        ones = (1,) * (weight.dim() - 2)
        self.lora_A = nn.Parameter(torch.empty(r, *weight.shape[1:], device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(weight.shape[0], r, *ones, device=device, dtype=dtype))
        if init == 'kaiming':
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        else:
            nn.init.normal_(self.lora_A, std=1 / r)
        if use_dora:
            self._init_magnitude()

    def delta_weight(self) -> torch.Tensor:
        return torch.einsum('or,r...->o...', self.lora_B.flatten(1), self.lora_A) * self.scaling

    def _column_norm(self, weight: torch.Tensor) -> torch.Tensor:
        # Shape (1, out, 1, ...) as PEFT's lora_magnitude_vector, so it broadcasts over (batch, out, ...) outputs.
        return weight.norm(p=2, dim=tuple(range(1, weight.dim())), keepdim=True).transpose(0, 1)

    def _as_weight_factor(self, factor: torch.Tensor) -> torch.Tensor:
        return factor.transpose(0, 1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        base = self.base_layer
        x = x.to(self.lora_A.dtype)
        dropped = self.lora_dropout(x)
        hidden = self._conv(dropped, self.lora_A, None, base.stride, base.padding, base.dilation)
        if not self.use_dora:  # scale the rank-r hidden, not the wider output
            return result + self._conv(hidden * self.scaling, self.lora_B).to(result.dtype)
        update = self._conv(hidden, self.lora_B)
        scale = self._dora_scale()
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            bias = base.bias
            plain = result if bias is None else result - bias.view(1, -1, *(1,) * (result.dim() - 2))
        else:
            plain = self._conv(dropped, base.weight.to(dropped.dtype), None, base.stride, base.padding, base.dilation)
        return result + ((scale - 1) * plain + scale * update * self.scaling).to(result.dtype)


def _map_plain_base_keys(layer: LoRALayer, state_dict: dict[str, Any], prefix: str, *_: Any) -> None:
    """Load-state-dict pre-hook: accept a state dict written without LoRA (a plain model's, or a checkpoint of a
    run without LoRAInject), whose base tensors are at ``<prefix>weight`` rather than ``<prefix>base_layer.weight``.

    Only when the state dict has ``<prefix>weight``: the base layer's keys are moved under ``base_layer.``, and
    :func:`_finish_plain_load` then accepts the adapter's own tensors as missing. A state dict written with LoRA is
    left alone, so one lacking its adapters still fails a strict load.
    """
    base_prefix = prefix + 'base_layer.'
    layer._plain_load_prefix = None
    if prefix + 'weight' not in state_dict:
        return
    own = {prefix + name for name in (*layer._parameters, *layer._buffers)}
    plain = [k for k in state_dict if k.startswith(prefix) and k not in own and not k.startswith(base_prefix)]
    # torch.distributed.checkpoint (FSDP2, full state dicts) hands over the model's own keys, at their current
    # values, next to the checkpoint's: the plain keys are the checkpoint's, whole tensors, sharded here as the base.
    current = layer.base_layer.state_dict(keep_vars=True)
    for key in plain:
        name, value = key[len(prefix) :], state_dict.pop(key)
        like = current.get(name)
        state_dict[base_prefix + name] = shard_like(value, like) if isinstance(like, torch.Tensor) else value
    layer._plain_load_prefix = prefix


def _finish_plain_load(layer: LoRALayer, incompatible_keys: Any) -> None:
    """Load-state-dict post-hook (after the base layer loaded): the adapter's tensors were not in a plain state
    dict, so they are not missing; re-derive what depends on the base weight (:meth:`LoRALayer.adopt_loaded_base`)."""
    prefix, layer._plain_load_prefix = layer._plain_load_prefix, None
    if prefix is None:
        return
    own = {prefix + name for name in (*layer._parameters, *layer._buffers)}
    incompatible_keys.missing_keys[:] = [key for key in incompatible_keys.missing_keys if key not in own]
    layer.adopt_loaded_base()


def adapter_class_for(module: nn.Module) -> Optional[type[LoRALayer]]:
    """The adapter layer for ``module``'s type, or ``None`` if the type is not supported."""
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return LoRAConv
    if isinstance(module, nn.Linear) or is_conv1d_transposed(module):
        return LoRALinear
    return None


SUPPORTED_TYPES = ('nn.Linear', 'transformers Conv1D', 'nn.Embedding', 'nn.Conv1d', 'nn.Conv2d')
