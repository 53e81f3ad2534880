"""Loading a checkpoint whose adapters have another rank fails with the rank, not torch's size mismatch.

Composer loads a checkpoint's model weights before any algorithm sees its state, so a resume with another ``r``
(or ``rank_pattern``) would stop at ``size mismatch for ...lora_A`` deep inside ``load_state_dict``. A pre-hook on
each adapter layer compares the incoming ``lora_A`` with the layer's before anything is copied and raises
:class:`~composer_thaw.core.resume_checks.ResumeConfigError` naming the option, the checkpoint's rank and the new
one. The other options are compared with the algorithm's saved state
(:func:`~composer_thaw.core.resume_checks.check_resume_config`).

Example:
    >>> from composer_thaw.lora_inject import LoRAInject, apply_lora
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> trained = tiny_decoder(num_layers=1).model
    >>> _ = apply_lora(trained, r=8, target_modules=['q_proj'])
    >>> checkpoint_trained_with_r_8 = trained.state_dict()
    >>> model = tiny_decoder(num_layers=1).model
    >>> _ = apply_lora(model, r=16, target_modules=['q_proj'])
    >>> refuse_adapters_of_another_rank(model, LoRAInject(r=16, target_modules=['q_proj']))
    >>> model.load_state_dict(checkpoint_trained_with_r_8)
    Traceback (most recent call last):
    ResumeConfigError: algorithms.lora_inject.r = 16: the checkpoint's adapter of model.layers.0.self_attn.q_proj has
    rank 8 (lora_A of shape (8, 64)), this LoRAInject gives it rank 16 (shape (16, 64)). ...
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from composer_thaw.core.resume_checks import ResumeConfigError
from composer_thaw.core.state import config_key
from composer_thaw.lora_inject.layers import LoRALayer

__all__ = ['refuse_adapters_of_another_rank']

_CHECKED = '_thaw_rank_check'  # marks an adapter layer that carries the hook


def refuse_adapters_of_another_rank(model: nn.Module, algorithm: Any) -> None:
    """Before a state dict loads into ``model``, check that its adapters have the ranks ``algorithm`` (a LoRAInject)
    gave ``model``'s adapter layers; once per layer, however often it is called."""
    for layer in model.modules():
        if isinstance(layer, LoRALayer) and not getattr(layer, _CHECKED, False):
            layer.register_load_state_dict_pre_hook(functools.partial(_check_rank, algorithm=algorithm))
            setattr(layer, _CHECKED, True)


def _check_rank(layer: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any, algorithm: Any) -> None:
    incoming = state_dict.get(f'{prefix}lora_A')
    current = getattr(layer, 'lora_A', None)
    if incoming is None or current is None or tuple(incoming.shape) == tuple(current.shape):
        return
    assert isinstance(layer, LoRALayer)
    rows, rank = current.shape[0], layer.r  # enabled slices stack their ranks: rows = rank * slices
    saved_rank = incoming.shape[0] * rank // rows if incoming.shape[0] * rank % rows == 0 else incoming.shape[0]
    field = 'r' if rank == algorithm.config.r else 'rank_pattern'
    raise ResumeConfigError(
        f'{config_key(type(algorithm))}.{field}',
        getattr(algorithm.config, field),
        f"the checkpoint's adapter of {prefix.rstrip('.')} has rank {saved_rank} (lora_A of shape "
        f'{tuple(incoming.shape)}), this LoRAInject gives it rank {rank} (shape {tuple(current.shape)}). Adapters load '
        'only into adapters of the same rank, also with load_weights_only: resume with the rank it was trained with, '
        'or export the merged model (save_merged_to) and train new adapters on that folder.',
    )
