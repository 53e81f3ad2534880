"""Show what RegexFreeze patterns would train, as a text table, without changing the model.

Example:
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> model = tiny_decoder('llama', num_layers=2)
    >>> print(freeze_preview(model, trainable=['lm_head', 'model.embed_tokens.weight[0:10]']))
    module                            trainable      total  rows
    model.embed_tokens                      640  1,953,408  weight: rows 0:10 of 30522
    model.layers.0.self_attn.q_proj           0      4,096  frozen
    ...
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from torch import nn

from composer_thaw.regex_freeze.patterns import Syntax, TensorSelection, select_parameters
from composer_thaw.utils.parameter_selection import user_module

__all__ = ['freeze_preview']


def _module_of(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition('.')
    return module or '(root)', leaf


def _rows_cell(tensors: list[tuple[str, TensorSelection]]) -> str:
    states = {t.describe_rows() for _, t in tensors}
    if len(states) == 1 and next(iter(states)) in ('all', 'frozen'):
        return next(iter(states))
    return '; '.join(f'{leaf}: {t.describe_rows()}' for leaf, t in tensors)


def freeze_preview(
    model: nn.Module,
    trainable: Optional[Sequence[str]] = None,
    frozen: Optional[Sequence[str]] = None,
    syntax: Syntax = 'axolotl',
) -> str:
    """A table of what ``RegexFreeze(trainable, frozen, syntax)`` would train on ``model``, one line per module.

    Columns: the module (parameter names without their last part), its trainable and total parameter counts, and
    which rows are trainable: ``all``, ``frozen``, or per tensor ``weight: rows 0:100 of 30522``. A last line gives
    the totals and the trainable fraction. The model is not changed.

    Args:
        model: a Hugging Face model, or it wrapped by Composer/DDP (names are the Hugging Face model's own).
        trainable: patterns of what to train; ``None`` means every parameter.
        frozen: patterns that then freeze tensors or rows.
        syntax: ``'axolotl'`` (default) or ``'regex'``.

    Raises:
        ValueError: the same errors RegexFreeze raises (a pattern that matches nothing, a bad row range).
    """
    selection = select_parameters(user_module(model), trainable, frozen, syntax)
    modules: dict[str, list[tuple[str, TensorSelection]]] = {}
    for name, tensor in selection.items():
        module, leaf = _module_of(name)
        modules.setdefault(module, []).append((leaf, tensor))
    rows = [('module', 'trainable', 'total', 'rows')]
    for module, tensors in modules.items():
        rows.append(
            (
                module,
                f'{sum(t.trainable_numel for _, t in tensors):,}',
                f'{sum(t.numel for _, t in tensors):,}',
                _rows_cell(tensors),
            )
        )
    rows.append(
        (
            'total',
            f'{selection.trainable_params:,}',
            f'{selection.total_params:,}',
            f'{100 * selection.trainable_fraction:.2f}% trainable',
        )
    )
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    lines = [f'{row[0]:<{widths[0]}}  {row[1]:>{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}' for row in rows]
    return '\n'.join(lines)
