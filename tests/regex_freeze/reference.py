"""A model where chosen parameters, or chosen rows of them, are trainable by hand: the reference for RegexFreeze.

Whole frozen tensors get ``requires_grad=False``; a partially trainable tensor is replaced (with
``torch.nn.utils.parametrize``) by the concatenation of a frozen buffer and one trainable leaf holding only the
trainable rows, so the optimizer sees, and weight decay touches, nothing else.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from composer_thaw.utils.parameter_selection import user_module


class RowsFromTrainableLeaf(nn.Module):
    """``weight = cat(frozen rows, trainable leaf rows)`` in row order; the leaf holds only ``trainable_rows``."""

    def __init__(self, full: torch.Tensor, trainable_rows: tuple[tuple[int, int], ...]):
        super().__init__()
        self.register_buffer('frozen_values', full.detach().clone())
        self.trainable_rows = trainable_rows
        self.num_rows = full.shape[0]

    def forward(self, leaf: torch.Tensor) -> torch.Tensor:
        pieces, cursor, offset = [], 0, 0
        for start, end in self.trainable_rows:
            if start > cursor:
                pieces.append(self.frozen_values[cursor:start])
            pieces.append(leaf[offset : offset + end - start])
            offset += end - start
            cursor = end
        if cursor < self.num_rows:
            pieces.append(self.frozen_values[cursor:])
        return torch.cat(pieces)

    def right_inverse(self, full: torch.Tensor) -> torch.Tensor:
        return torch.cat([full[start:end] for start, end in self.trainable_rows])


def make_trainable_by_hand(
    model: nn.Module, trainable_rows: dict[str, tuple[tuple[int, int], ...]]
) -> list[nn.Parameter]:
    """Freeze ``model`` except ``trainable_rows`` (name -> ranges; absent: frozen). Returns the trainable leaves."""
    root = user_module(model)
    leaves = []
    for name, param in list(root.named_parameters()):
        rows = trainable_rows.get(name, ())
        module_name, _, attribute = name.rpartition('.')
        module = root.get_submodule(module_name)
        if not rows:
            param.requires_grad_(False)
        elif rows == ((0, param.shape[0]),):
            leaves.append(param)
        else:
            parametrize.register_parametrization(module, attribute, RowsFromTrainableLeaf(param, rows), unsafe=True)
            leaves.append(module.parametrizations[attribute].original)
    return leaves


def full_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of the user model by its original name, as the full tensor (parametrizations evaluated)."""
    root = user_module(model)
    values = {}
    for name, module in root.named_modules():
        for attribute, param in module.named_parameters(recurse=False):
            values[f'{name}.{attribute}' if name else attribute] = param.detach().clone()
        if parametrize.is_parametrized(module):
            for attribute in module.parametrizations:
                values[f'{name}.{attribute}'] = getattr(module, attribute).detach().clone()
    return {name: value for name, value in values.items() if '.parametrizations.' not in name}
