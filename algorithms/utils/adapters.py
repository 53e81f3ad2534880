"""What an adapter is, for every algorithm: a model records the configuration its adapters were injected with.

An adapter algorithm (``LoRAInject``) calls :func:`record_adapter_config` on the user's model once it has injected
its adapters; any other algorithm asks :func:`adapter_config_of` (``HiFTRotation(lora=True)`` rotates over the
adapters and needs to know that there are some) without importing the adapter algorithm.

Example:
    >>> from composer_thaw.lora_inject.config import LoRAConfig
    >>> model = nn.Sequential(nn.Linear(4, 4))
    >>> has_adapters(model)
    False
    >>> record_adapter_config(model, LoRAConfig(r=8))  # what LoRAInject does once it has injected its adapters
    >>> has_adapters(model), adapter_config_of(model).r
    (True, 8)
"""

from __future__ import annotations

from typing import Any, Optional

from torch import nn

from composer_thaw.utils.parameter_selection import user_module

__all__ = ['ADAPTER_CONFIG_ATTRIBUTE', 'adapter_config_of', 'has_adapters', 'record_adapter_config']

ADAPTER_CONFIG_ATTRIBUTE = 'thaw_lora_config'
"""The attribute of the user's model that holds its adapters' configuration."""


def adapter_config_of(model: nn.Module) -> Optional[Any]:
    """The configuration ``model``'s adapters were injected with, or ``None`` (wrappers are looked through)."""
    return getattr(user_module(model), ADAPTER_CONFIG_ATTRIBUTE, None)


def has_adapters(model: nn.Module) -> bool:
    """Whether an adapter algorithm injected adapters into ``model``."""
    return adapter_config_of(model) is not None


def record_adapter_config(model: nn.Module, config: Any) -> None:
    """Mark ``model`` (the user's module inside any wrapper) as adapted with ``config``."""
    setattr(user_module(model), ADAPTER_CONFIG_ATTRIBUTE, config)
