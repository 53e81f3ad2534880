"""Test oracle: which rows axolotl's ``unfrozen_parameters`` leaves trainable, following its code step by step.

Reconstructed from axolotl ``src/axolotl/utils/freeze.py`` (``freeze_layers_except``, ``LayerNamePattern``,
``_merge_ranges``): for each pattern an optional trailing ``[start:end]`` / ``[index]`` is split off with
``^(.+)\\[([0-9]*)(?::([0-9]*))?\\]$``; every ``.`` not followed by ``+`` in the rest becomes ``\\.``; a parameter is
trainable when any pattern ``re.match``-es its name; the ranges of the matching patterns that have one are merged,
and when there are any, only those rows stay trainable.
"""

from __future__ import annotations

import re
from typing import Optional

import torch


def _split_range(pattern: str) -> tuple[str, Optional[tuple[int, Optional[int]]]]:
    found = re.match(r'^(.+)\[([0-9]*)(?::([0-9]*))?\]$', pattern)
    if not found:
        return pattern, None
    base, start, end = found.groups()
    if end is None and start.isdecimal():
        return base, (int(start), int(start) + 1)
    return base, (int(start) if start else 0, int(end) if end else None)


def axolotl_row_masks(shapes: dict[str, tuple[int, ...]], patterns: list[str]) -> dict[str, torch.Tensor]:
    """``name -> bool vector over dim 0`` (True: trainable) as axolotl would leave ``shapes``' parameters."""
    compiled = []
    for pattern in patterns:
        base, rows = _split_range(pattern)
        compiled.append((re.compile(re.sub(r'\.(?!\+)', '\\\\.', base)), rows))
    masks = {}
    for name, shape in shapes.items():
        size = shape[0]
        requires_grad, ranges = False, []
        for regex, rows in compiled:
            if regex.match(name) is None:
                continue
            requires_grad = True
            if rows is not None:
                ranges.append((rows[0], size if rows[1] is None else rows[1]))
        for start, end in ranges:
            assert 0 <= start < end <= size, 'axolotl raises ValueError here'
        mask = torch.zeros(size, dtype=torch.bool)
        if requires_grad:
            if ranges:
                for start, end in ranges:  # union of the ranges == axolotl's merged ranges
                    mask[start:end] = True
            else:
                mask[:] = True
        masks[name] = mask
    return masks


def axolotl_matches(name: str, pattern: str) -> bool:
    """Whether axolotl's ``LayerNamePattern(pattern).match(name)`` is true."""
    base, _ = _split_range(pattern)
    return re.match(re.sub(r'\.(?!\+)', '\\\\.', base), name) is not None
