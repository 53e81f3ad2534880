"""Parse parameter patterns and decide, without touching the model, which tensors and rows are trainable.

Two syntaxes:

``axolotl`` (default) behaves exactly as axolotl's ``unfrozen_parameters`` code (``utils/freeze.py``):
    an optional trailing ``[start:end]``, ``[:end]``, ``[start:]``, ``[:]`` or ``[index]`` selects rows (dim 0);
    in the rest, every ``.`` not followed by ``+`` becomes ``\\.`` (a literal dot; ``.+`` stays a wildcard, as in
    axolotl since it added that exception), and the result is matched with :func:`re.match` against the
    parameter name: anchored at the start, not at the end unless the pattern ends with ``$``.
``regex``
    plain Python regular expressions matched with :func:`re.search` (anywhere in the name), no dot rewriting;
    the same trailing row range is accepted.

Several patterns that match one tensor merge their ranges. As in axolotl, a pattern without a range makes the
whole tensor trainable only when no pattern with a range matches that tensor. Patterns in ``frozen`` are applied
after those in ``trainable``: without a range they freeze the whole tensor, with a range they freeze those rows.

Example:
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> hf_model = tiny_decoder(num_layers=2).model
    >>> selection = select_parameters(hf_model, trainable=['model.embed_tokens.weight[0:100]', 'lm_head'])
    >>> selection['model.embed_tokens.weight'].trainable_rows
    ((0, 100),)
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from composer_thaw.core.validation import closest_names
from composer_thaw.utils.parameter_selection import parameter_aliases

__all__ = [
    'SYNTAXES',
    'ParameterPattern',
    'Selection',
    'Syntax',
    'TensorSelection',
    'merge_ranges',
    'parse_patterns',
    'select_parameters',
]

Syntax = Literal['axolotl', 'regex']
SYNTAXES = ('axolotl', 'regex')
RowRange = tuple[int, int]
Ranges = tuple[RowRange, ...]

# The row range axolotl recognizes: a trailing [digits], [digits:digits] with either side optional.
_RANGE = re.compile(r'^(?P<base>.+)\[(?P<start>[0-9]*)(?::(?P<end>[0-9]*))?\]$')
# A trailing bracket group that was meant as a row range but is not one of the forms above
# (a ':' never occurs in parameter names, so a character class holding one is not meant as such).
_RANGE_LIKE = re.compile(r'\[(?P<body>[^\[\]]*)\]$')
_INDEX_LIKE = re.compile(r'^\s*[-+]?\s*[0-9]+\s*$')


@dataclass(frozen=True)
class ParameterPattern:
    """One pattern as written, the compiled name regex and its optional row range (``end`` None: to the last row)."""

    text: str
    regex: re.Pattern
    syntax: Syntax
    start: Optional[int] = None
    end: Optional[int] = None

    @property
    def has_range(self) -> bool:
        return self.start is not None

    def matches(self, name: str) -> bool:
        if self.syntax == 'axolotl':
            return self.regex.match(name) is not None
        return self.regex.search(name) is not None

    def rows(self, num_rows: int) -> RowRange:
        """The half-open row range on a tensor with ``num_rows`` rows (only for patterns with a range)."""
        assert self.start is not None
        return self.start, num_rows if self.end is None else self.end

    def describe_matching(self) -> str:
        if self.syntax == 'axolotl':
            return f'regex {self.regex.pattern!r}, matched with re.match from the start of each name'
        return f'regex {self.regex.pattern!r}, searched anywhere in each name'


def _malformed(text: str, list_name: str, problem: str) -> ValueError:
    return ValueError(
        f'{list_name} pattern {text!r}: malformed row range: {problem}. A row range ends the pattern and is one of '
        '[start:end], [start:], [:end], [:] or [index], with non-negative integers and no spaces, e.g. '
        "'model.embed_tokens.weight[32000:32010]'.",
    )


def _parse_one(text: str, syntax: Syntax, list_name: str) -> ParameterPattern:
    if not isinstance(text, str):
        raise TypeError(f'{list_name} patterns must be strings; got {text!r} ({type(text).__name__}).')
    if not text:
        raise ValueError(f'{list_name} contains an empty pattern; an empty pattern would match every parameter.')
    start: Optional[int] = None
    end: Optional[int] = None
    base = text
    parsed = _RANGE.match(text)
    if parsed is not None and (parsed['end'] is not None or parsed['start']):
        base = parsed['base']
        if parsed['end'] is None:  # [index]
            start = int(parsed['start'])
            end = start + 1
        else:
            start = int(parsed['start']) if parsed['start'] else 0
            end = int(parsed['end']) if parsed['end'] else None
            if end is not None and start >= end:
                raise ValueError(
                    f'{list_name} pattern {text!r}: empty row range [{start}:{end}]; the end must be greater than '
                    f'the start (rows start..end-1 are selected), e.g. [{start}:{start + 1}].',
                )
    else:
        range_like = _RANGE_LIKE.search(text)
        if range_like is not None:
            body = range_like['body']
            if body == '':
                raise _malformed(text, list_name, 'empty brackets []')
            if ':' in body or _INDEX_LIKE.match(body):
                if range_like.start() == 0:
                    raise _malformed(text, list_name, 'no parameter name before the range')
                raise _malformed(text, list_name, f'[{body}] is not a range of non-negative integers')
    if syntax == 'axolotl':
        # axolotl's LayerNamePattern: a '.' is a literal dot, unless it is followed by '+'.
        source = re.sub(r'\.(?!\+)', r'\\.', base)
    else:
        source = base
    try:
        regex = re.compile(source)
    except re.error as error:
        raise ValueError(
            f'{list_name} pattern {text!r} is not a valid regular expression ({source!r}): {error}.'
        ) from error
    return ParameterPattern(text=text, regex=regex, syntax=syntax, start=start, end=end)


def parse_patterns(patterns: Optional[Sequence[str]], syntax: Syntax, list_name: str) -> tuple[ParameterPattern, ...]:
    """Parse and compile ``patterns``; raise ``TypeError``/``ValueError`` naming ``list_name`` and the bad pattern."""
    if syntax not in SYNTAXES:
        raise ValueError(f'syntax={syntax!r} is not a pattern syntax; choose one of {list(SYNTAXES)}.')
    if patterns is None:
        return ()
    if isinstance(patterns, str) or not isinstance(patterns, (list, tuple)):
        raise TypeError(
            f'{list_name} must be a list of pattern strings, got {patterns!r} ({type(patterns).__name__}); '
            f'write {list_name}=[{patterns!r}] for a single pattern.',
        )
    return tuple(_parse_one(text, syntax, list_name) for text in patterns)


def merge_ranges(ranges: Iterable[RowRange]) -> Ranges:
    """Sort half-open ranges and merge those that overlap or touch."""
    merged: list[list[int]] = []
    for start, end in sorted(ranges):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return tuple((start, end) for start, end in merged)


def _subtract(ranges: Ranges, removed: Ranges) -> Ranges:
    result: list[RowRange] = []
    for start, end in ranges:
        cursor = start
        for cut_start, cut_end in removed:
            if cut_end <= cursor or cut_start >= end:
                continue
            if cut_start > cursor:
                result.append((cursor, cut_start))
            cursor = max(cursor, cut_end)
        if cursor < end:
            result.append((cursor, end))
    return tuple(result)


@dataclass(frozen=True)
class TensorSelection:
    """What of one parameter tensor is trainable: ``trainable_rows`` are merged half-open ranges over dim 0.

    A 0-d tensor counts as one row.
    """

    name: str
    shape: tuple[int, ...]
    trainable_rows: Ranges

    @property
    def num_rows(self) -> int:
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        numel = 1
        for size in self.shape[1:]:
            numel *= size
        return numel

    @property
    def numel(self) -> int:
        return self.num_rows * self.row_numel

    @property
    def trainable_numel(self) -> int:
        return sum(end - start for start, end in self.trainable_rows) * self.row_numel

    @property
    def fully_trainable(self) -> bool:
        return self.trainable_rows == ((0, self.num_rows),) or (self.num_rows == 0 and self.trainable_rows == ())

    @property
    def fully_frozen(self) -> bool:
        return not self.trainable_rows and self.num_rows > 0

    @property
    def partially_trainable(self) -> bool:
        return not self.fully_trainable and not self.fully_frozen

    @property
    def frozen_rows(self) -> Ranges:
        return _subtract(((0, self.num_rows),), self.trainable_rows)

    def trainable_row_mask(self) -> torch.Tensor:
        """A boolean vector with one entry per row: ``True`` where the row is trainable."""
        mask = torch.zeros(self.num_rows, dtype=torch.bool)
        for start, end in self.trainable_rows:
            mask[start:end] = True
        return mask

    def describe_rows(self) -> str:
        if self.fully_trainable:
            return 'all'
        if self.fully_frozen:
            return 'frozen'
        spans = ', '.join(f'{start}:{end}' for start, end in self.trainable_rows)
        return f'rows {spans} of {self.num_rows}'


class Selection(Mapping[str, TensorSelection]):
    """The trainable part of every parameter of a model, by canonical parameter name, in registration order."""

    def __init__(self, tensors: Mapping[str, TensorSelection]):
        self._tensors = dict(tensors)

    def __getitem__(self, name: str) -> TensorSelection:
        return self._tensors[name]

    def __iter__(self):
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self._tensors.values())

    @property
    def trainable_params(self) -> int:
        return sum(t.trainable_numel for t in self._tensors.values())

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / self.total_params if self.total_params else 0.0

    def as_plain_data(self) -> dict[str, list[list[int]]]:
        """``{name: [[start, end], ...]}`` for tensors with trainable rows (what checkpoints record)."""
        return {name: [list(r) for r in t.trainable_rows] for name, t in self._tensors.items() if t.trainable_rows}


def _rows_of(pattern: ParameterPattern, list_name: str, name: str, shape: tuple[int, ...]) -> RowRange:
    if not shape:
        raise ValueError(
            f'{list_name} pattern {pattern.text!r} gives a row range, but it matches {name!r}, a 0-d (scalar) tensor '
            'that has no rows; drop the range or make the pattern exclude that parameter (e.g. end it with $).',
        )
    num_rows = shape[0]
    start, end = pattern.rows(num_rows)
    if end > num_rows or start >= end:
        raise ValueError(
            f'{list_name} pattern {pattern.text!r} selects rows [{start}:{end}] of {name!r}, which has {num_rows} rows '
            f'(shape {list(shape)}); valid ranges satisfy 0 <= start < end <= {num_rows}.',
        )
    return start, end


def _no_match_error(unmatched: list[tuple[str, ParameterPattern]], names: list[str], model_name: str) -> ValueError:
    lines = []
    for list_name, pattern in unmatched:
        base = pattern.text if not pattern.has_range else pattern.text[: pattern.text.rindex('[')]
        close = ', '.join(repr(n) for n in closest_names(base.strip('^$'), names))
        lines.append(
            f'{list_name} pattern {pattern.text!r} ({pattern.describe_matching()}) matches no parameter of '
            f'{model_name}. Closest parameter names: {close}.',
        )
    hint = (
        'Patterns match the names of the Hugging Face model itself (as in `hf_model.named_parameters()`), e.g. '
        "'model.layers.3' or 'lm_head'; use `freeze_preview(model, trainable=[...])` to see what a pattern selects."
    )
    return ValueError('\n'.join(lines + [hint]))


def select_parameters(
    model: nn.Module,
    trainable: Optional[Sequence[str] | Sequence[ParameterPattern]] = None,
    frozen: Optional[Sequence[str] | Sequence[ParameterPattern]] = None,
    syntax: Syntax = 'axolotl',
) -> Selection:
    """Decide which parameters and rows of ``model`` are trainable. Reads the model, changes nothing.

    Args:
        model: the module whose parameter names the patterns are written against (use
            :func:`~composer_thaw.utils.parameter_selection.user_module` to unwrap Composer and DDP first).
        trainable: patterns of what to train; ``None`` means every parameter.
        frozen: patterns applied afterwards that freeze tensors (no range) or rows (with a range).
        syntax: ``'axolotl'`` or ``'regex'``, see the module docstring.

    A tied parameter is matched under each of its names and reported under its first.

    Raises:
        ValueError: a pattern that matches no parameter (all such patterns are listed, each with the closest
            parameter names), a row range outside a tensor's rows or empty on it, a range on a 0-d tensor.
    """
    trainable_patterns = _as_patterns(trainable, syntax, 'trainable')
    frozen_patterns = _as_patterns(frozen, syntax, 'frozen')
    aliases = parameter_aliases(model)
    params = dict(model.named_parameters())
    all_names = [alias for names in aliases.values() for alias in names]
    used: set[int] = set()
    tensors: dict[str, TensorSelection] = {}
    for name, names in aliases.items():
        shape = tuple(params[name].shape)
        num_rows = shape[0] if shape else 1
        if trainable is None:
            rows: Ranges = ((0, num_rows),)
        else:
            ranges, whole = [], False
            for index, pattern in enumerate(trainable_patterns):
                if not any(pattern.matches(alias) for alias in names):
                    continue
                used.add(index)
                if pattern.has_range:
                    ranges.append(_rows_of(pattern, 'trainable', name, shape))
                else:
                    whole = True
            # axolotl: the ranges of the patterns with a range win over patterns without one.
            rows = merge_ranges(ranges) if ranges else (((0, num_rows),) if whole else ())
        frozen_ranges, frozen_whole = [], False
        for index, pattern in enumerate(frozen_patterns):
            if not any(pattern.matches(alias) for alias in names):
                continue
            used.add(len(trainable_patterns) + index)
            if pattern.has_range:
                frozen_ranges.append(_rows_of(pattern, 'frozen', name, shape))
            else:
                frozen_whole = True
        if frozen_whole:
            rows = ()
        elif frozen_ranges:
            rows = _subtract(rows, merge_ranges(frozen_ranges))
        tensors[name] = TensorSelection(name, shape, rows)
    everything = [('trainable', p) for p in trainable_patterns] + [('frozen', p) for p in frozen_patterns]
    unmatched = [entry for index, entry in enumerate(everything) if index not in used]
    if unmatched:
        raise _no_match_error(unmatched, all_names, type(model).__name__)
    return Selection(tensors)


def _as_patterns(patterns, syntax: Syntax, list_name: str) -> tuple[ParameterPattern, ...]:
    if patterns is not None and all(isinstance(p, ParameterPattern) for p in patterns):
        return tuple(patterns)
    return parse_patterns(patterns, syntax, list_name)
