"""What to adapt and how: :class:`LoRAConfig`, validated on construction.

Module selection means what it means in PEFT (0.16), so a PEFT ``adapter_config.json`` selects the same modules
here; the rules are written once, in :mod:`composer_thaw.lora_inject.matching`:

* ``target_modules`` as a list: a module is a target if its name equals an entry or ends with ``'.' + entry``
  (``'q_proj'`` matches ``model.layers.0.self_attn.q_proj``).
* ``target_modules`` as a string: a regex that must match the whole module name, or the shorthand ``'all-linear'``
  (the full names of every ``nn.Linear`` and GPT-2 ``Conv1D`` but the LM head of a transformers model).
* ``target_modules=None``: the default for the model's ``config.model_type`` (PEFT's mapping, see
  :data:`DEFAULT_TARGET_MODULES`).
* ``layers_to_transform`` (with a list of ``target_modules`` only): a module matched by name suffix must sit in a
  block with one of these indices (``model.layers.<i>.``; ``layers_pattern`` names the container). A module named
  in full in the list is adapted whatever its block, as in PEFT.
* ``exclude_modules``: never adapted (a regex matching the whole name, or a list matched like ``target_modules``).
* ``modules_to_save``: every module whose name *ends with* an entry (a plain suffix: ``'classifier'`` also saves
  ``pre_classifier``) trains in full. A module named like an entry (dot boundary), or inside one, is never adapted.
* ``rank_pattern`` / ``alpha_pattern``: ``{pattern: value}``; the first pattern ``p`` for which
  ``re.match(rf'(.*\\.)?({p})$', name)`` holds gives that module its own rank / alpha.

Module names are relative to the user's model (``user_module(model)``), as PEFT sees them.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal, Optional, Union, get_args

from composer_thaw.core.options import ConfigOptions

__all__ = [
    'ALL_LINEAR',
    'DEFAULT_TARGET_MODULES',
    'OPTIONS',
    'TASK_MODULES_TO_SAVE',
    'BiasMode',
    'InitMethod',
    'LoRAConfig',
    'TaskType',
    'pattern_value',
]

ALL_LINEAR = 'all-linear'

InitMethod = Literal['kaiming', 'gaussian', 'pissa']
BiasMode = Literal['none', 'all', 'lora_only']
TaskType = Literal['SEQ_CLS', 'SEQ_2_SEQ_LM', 'CAUSAL_LM', 'TOKEN_CLS', 'QUESTION_ANS', 'FEATURE_EXTRACTION']
"""PEFT's ``TaskType`` values."""

# The heads PEFT's task models add to modules_to_save (peft_model.py: PeftModelForSequenceClassification,
# ...ForTokenClassification, ...ForQuestionAnswering); the other task types change nothing LoRA trains.
TASK_MODULES_TO_SAVE: dict[str, tuple[str, ...]] = {
    'SEQ_CLS': ('classifier', 'score'),
    'TOKEN_CLS': ('classifier', 'score'),
    'QUESTION_ANS': ('qa_outputs',),
}

# Default targets per Hugging Face ``config.model_type``: PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
# entry by entry (tests/lora_inject/test_matching.py compares them), up to PEFT 0.21 (gemma4, nemotron_h, rwkv and
# rwkv7 came after 0.16); mostly the query and value projections. A string is a regex, as a target_modules string.
DEFAULT_TARGET_MODULES: dict[str, Union[str, tuple[str, ...]]] = {
    'bart': ('q_proj', 'v_proj'),
    'bert': ('query', 'value'),
    'blip-2': ('q', 'v', 'q_proj', 'v_proj'),
    'bloom': ('query_key_value',),
    'btlm': ('c_proj', 'c_attn'),
    'chatglm': ('query_key_value',),
    'codegen': ('qkv_proj',),
    'deberta': ('in_proj',),
    'deberta-v2': ('query_proj', 'value_proj'),
    'electra': ('query', 'value'),
    'falcon': ('query_key_value',),
    'gemma': ('q_proj', 'v_proj'),
    'gemma2': ('q_proj', 'v_proj'),
    'gemma3_text': ('q_proj', 'v_proj'),
    'gemma4': r'.*language_model\..*\.(q_proj|v_proj)',
    'gpt2': ('c_attn',),
    'gpt_bigcode': ('c_attn',),
    'gpt_neo': ('q_proj', 'v_proj'),
    'gpt_neox': ('query_key_value',),
    'gptj': ('q_proj', 'v_proj'),
    'layoutlm': ('query', 'value'),
    'llama': ('q_proj', 'v_proj'),
    'llama4': ('q_proj', 'v_proj'),
    'mistral': ('q_proj', 'v_proj'),
    'mixtral': ('q_proj', 'v_proj'),
    'mpt': ('Wqkv',),
    'mt5': ('q', 'v'),
    'nemotron_h': ('q_proj', 'k_proj', 'v_proj', 'o_proj'),
    'opt': ('q_proj', 'v_proj'),
    'phi': ('q_proj', 'v_proj', 'fc1', 'fc2'),
    'qwen2': ('q_proj', 'v_proj'),
    'qwen3': ('q_proj', 'v_proj'),
    'RefinedWeb': ('query_key_value',),
    'RefinedWebModel': ('query_key_value',),
    'roberta': ('query', 'value'),
    'rwkv': ('key', 'value', 'receptance', 'output'),
    'rwkv7': ('r_proj', 'k_proj', 'v_proj', 'o_proj', 'key', 'value'),
    'stablelm': ('q_proj', 'v_proj'),
    't5': ('q', 'v'),
    'xlm-roberta': ('query', 'value'),
}


def pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """The value of the first pattern in ``patterns`` matching the end of module ``name`` (PEFT's rule)."""
    for pattern, value in patterns.items():
        if re.match(rf'(.*\.)?({pattern})$', name):
            return value
    return default


def _check_positive_number(key: str, value: Any, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f'{key}={value!r} is invalid: {what} must be a positive number.')


def _check_rank(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f'{key}={value!r} is invalid: the rank must be a positive integer (e.g. 8).')


def _check_bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f'{key}={value!r} is invalid: it must be a bool (True or False).')


def _check_choice(key: str, value: Any, choice_type: Any) -> None:
    choices = get_args(choice_type)
    if not isinstance(value, str) or value not in choices:
        listed = ', '.join(repr(c) for c in choices)
        raise ValueError(f'{key}={value!r} is invalid: choose one of {listed}.')


def _check_mapping(key: str, value: Any, what: str) -> None:
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise TypeError(f'{key}={value!r} is invalid: give a dict {{pattern: {what}}} with regex strings as keys.')


def _check_regex(key: str, pattern: str) -> None:
    if not isinstance(pattern, str):
        raise TypeError(f'{key}={pattern!r} is invalid: it must be a regular expression (a string).')
    try:
        re.compile(pattern)
    except re.error as error:
        raise ValueError(f'{key}={pattern!r} is not a valid regular expression: {error}.') from error


def _as_list(names: Union[set[str], tuple[str, ...]]) -> list[str]:
    """A tuple of names in its order, a set (which has none) sorted."""
    return sorted(names) if isinstance(names, set) else list(names)


def _checked_names(key: str, value: Any) -> Optional[Union[list[str], str]]:
    """A list of module names / name suffixes (a tuple becomes a list, a set a sorted one), a regex string, or
    ``None``."""
    if value is None:
        return None
    if isinstance(value, str):
        _check_regex(key, value)
        return value
    if isinstance(value, (set, tuple)):
        value = _as_list(value)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TypeError(f'{key}={value!r} is invalid: give a list of module names or name suffixes, a regex, or None.')
    return value


def _checked_layers_pattern(value: Any, layers: Any) -> Optional[Union[list[str], str]]:
    """``layers_pattern``: a regex or a list of them, ``None`` when empty (PEFT's reading); needs block indices."""
    if value is None or (isinstance(value, (str, list, tuple)) and not value):
        return None
    if isinstance(value, tuple):
        value = list(value)
    patterns = [value] if isinstance(value, str) else value
    if not isinstance(patterns, list) or not all(isinstance(p, str) and p for p in patterns):
        raise TypeError(
            f'layers_pattern={value!r} is invalid: give the name of the block container as a string (e.g. '
            "'layers' or 'h'), a list of such names, or None.",
        )
    if layers is None:
        raise ValueError(
            f'layers_pattern={value!r} needs layers_to_transform: it only says where block indices are in module '
            'names.',
        )
    for pattern in patterns:
        _check_regex('layers_pattern', pattern)
    return value


@dataclass
class LoRAConfig:
    """Configuration of low-rank adapters (field names and meanings as in PEFT's ``LoraConfig``).

    Args:
        r: rank of each adapter (``r > 0``).
        lora_alpha: scale numerator: the update is ``lora_alpha / r * B @ A`` (``lora_alpha / sqrt(r)`` with rsLoRA).
        target_modules: list of names / name suffixes, a full-match regex, ``'all-linear'``, or ``None`` for the
            default of the model's ``model_type``.
        exclude_modules: modules never adapted: a list of names / name suffixes, or a full-match regex.
        layers_to_transform: with a list of ``target_modules``: adapt modules matched by name suffix only inside
            these block indices (``model.layers.<i>.``).
        layers_pattern: name (a regex) of the block container (``'layers'``, ``'h'``), or a list of them tried in
            order, for ``layers_to_transform``; by default the index in the last ``.<name>.<i>.`` is used, as in PEFT.
        rank_pattern: per-target rank overrides ``{pattern: r}``.
        alpha_pattern: per-target alpha overrides ``{pattern: alpha}``.
        lora_dropout: dropout on the adapter's input, in ``[0, 1)``.
        use_rslora: scale by ``lora_alpha / sqrt(r)`` (rank-stabilized LoRA).
        use_dora: weight-decomposed LoRA (DoRA): a trainable magnitude per output channel.
        init: ``'kaiming'`` (A Kaiming-uniform, B zero: the model is unchanged at step 0), ``'gaussian'`` (A normal
            with std ``1/r``, B zero) or ``'pissa'`` (A, B from the top-r singular vectors; the base weight becomes the
            residual).
        bias: which biases train: ``'none'``, ``'all'``, or ``'lora_only'`` (biases of adapted modules).
        modules_to_save: modules trained in full besides the adapters (e.g. ``['classifier']``): every module
            whose name ends with an entry (a plain suffix, as in PEFT: ``'classifier'`` also saves
            ``pre_classifier``). A module named like an entry, or inside one, is never adapted; a target that is
            saved only by the plain suffix is refused (exclude it with ``exclude_modules``).
        enable_slices: fused projections adapted per slice, ``{pattern: [True, False, True]}``: the output features
            are split into equal slices and only the enabled slices get an adapter (loralib's ``MergedLinear``), e.g.
            ``{'c_attn': [True, False, True]}`` adapts query and value of GPT-2's fused ``c_attn``. Patterns match as in
            ``rank_pattern``. Such adapters cannot be written in PEFT's format.
        task_type: PEFT's task type (``'SEQ_CLS'``, ``'TOKEN_CLS'``, ``'QUESTION_ANS'``, ``'CAUSAL_LM'``,
            ``'SEQ_2_SEQ_LM'``, ``'FEATURE_EXTRACTION'``) or ``None``. As in PEFT, ``'SEQ_CLS'`` and ``'TOKEN_CLS'``
            add ``classifier`` and ``score``, ``'QUESTION_ANS'`` adds ``qa_outputs`` to ``modules_to_save`` (entries
            that match no module are ignored, as PEFT does; see :meth:`saved_entries`); the others change nothing
            that trains. It is written to ``adapter_config.json``, where PEFT picks its task model from it.
    """

    r: int = 8
    lora_alpha: float = 8
    target_modules: Optional[Union[list[str], str]] = None
    exclude_modules: Optional[Union[list[str], str]] = None
    layers_to_transform: Optional[Union[list[int], int]] = None
    layers_pattern: Optional[Union[list[str], str]] = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    lora_dropout: float = 0.0
    use_rslora: bool = False
    use_dora: bool = False
    init: InitMethod = 'kaiming'
    bias: BiasMode = 'none'
    modules_to_save: Optional[list[str]] = None
    enable_slices: dict[str, list[bool]] = field(default_factory=dict)
    task_type: Optional[TaskType] = None

    def __post_init__(self) -> None:
        _check_rank('r', self.r)
        _check_positive_number('lora_alpha', self.lora_alpha, 'lora_alpha')
        if (
            isinstance(self.lora_dropout, bool)
            or not isinstance(self.lora_dropout, (int, float))
            or not (0 <= self.lora_dropout < 1)
        ):
            raise ValueError(f'lora_dropout={self.lora_dropout!r} is invalid: it must be a number in [0, 1).')
        targets = self.target_modules
        if isinstance(targets, str):
            if targets.lower() != ALL_LINEAR:
                _check_regex('target_modules', targets)
        elif targets is not None:
            if isinstance(targets, (set, tuple)):
                self.target_modules = targets = _as_list(targets)
            if not isinstance(targets, list) or not targets or not all(isinstance(t, str) and t for t in targets):
                raise ValueError(
                    f'target_modules={targets!r} is invalid: give a non-empty list of module names, a regex string, '
                    f"'{ALL_LINEAR}', or None for the default of the model type.",
                )
        layers = self.layers_to_transform
        if layers is not None:
            indices = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if (
                not isinstance(indices, list)
                or not indices
                or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices)
            ):
                raise ValueError(
                    f'layers_to_transform={layers!r} is invalid: give a block index or a non-empty list of block '
                    'indices (integers >= 0).',
                )
        self.exclude_modules = _checked_names('exclude_modules', self.exclude_modules)
        self.layers_pattern = _checked_layers_pattern(self.layers_pattern, layers)
        if isinstance(targets, str) and layers is not None:
            raise ValueError(
                f'layers_to_transform={layers!r} cannot be combined with target_modules={targets!r}: as in PEFT, '
                "block indices apply to a list of module names only. Give a list (e.g. ['q_proj', 'v_proj']), or "
                "write the block indices into the regex (e.g. r'.*\\.layers\\.(2|3)\\..*_proj')."
            )
        _check_mapping('rank_pattern', self.rank_pattern, 'rank')
        _check_mapping('alpha_pattern', self.alpha_pattern, 'alpha')
        _check_mapping('enable_slices', self.enable_slices, '[True, False, ...]')
        for pattern, rank in self.rank_pattern.items():
            _check_regex(f'rank_pattern[{pattern!r}]', pattern)
            _check_rank(f'rank_pattern[{pattern!r}]', rank)
        for pattern, alpha in self.alpha_pattern.items():
            _check_regex(f'alpha_pattern[{pattern!r}]', pattern)
            _check_positive_number(f'alpha_pattern[{pattern!r}]', alpha, 'alpha')
        _check_bool('use_rslora', self.use_rslora)
        _check_bool('use_dora', self.use_dora)
        _check_choice('init', self.init, InitMethod)
        _check_choice('bias', self.bias, BiasMode)
        if self.task_type is not None:
            _check_choice('task_type', self.task_type, TaskType)
        if self.modules_to_save is not None and (
            not isinstance(self.modules_to_save, list)
            or not all(isinstance(m, str) and m for m in self.modules_to_save)
        ):
            raise ValueError(f'modules_to_save={self.modules_to_save!r} is invalid: give a list of module names.')
        for entry in self.modules_to_save or []:
            _check_regex('modules_to_save', entry)  # PEFT reads each entry as a regex too (never adapted: see matching)
        for pattern, slices in self.enable_slices.items():
            _check_regex(f'enable_slices[{pattern!r}]', pattern)
            if (
                not isinstance(slices, list)
                or len(slices) < 2
                or not all(isinstance(s, bool) for s in slices)
                or not any(slices)
            ):
                raise ValueError(
                    f'enable_slices[{pattern!r}]={slices!r} is invalid: give one boolean per slice (at least two), '
                    'with at least one True, e.g. [True, False, True] for query and value of a fused qkv.',
                )
        if self.use_dora and self.enable_slices:
            raise ValueError('use_dora=True cannot be combined with enable_slices: DoRA needs the whole weight.')
        if self.init == 'pissa' and self.enable_slices:
            raise ValueError("init='pissa' cannot be combined with enable_slices.")

    def saved_entries(self) -> list[str]:
        """``modules_to_save`` with the task type's heads added (PEFT's task models add them the same way).

        Example:
            >>> LoRAConfig(task_type='SEQ_CLS', modules_to_save=['pooler']).saved_entries()
            ['pooler', 'classifier', 'score']
        """
        task = TASK_MODULES_TO_SAVE.get(self.task_type or '', ())
        return list(dict.fromkeys([*(self.modules_to_save or []), *task]))

    def rank_of(self, name: str) -> int:
        return pattern_value(self.rank_pattern, name, self.r)

    def alpha_of(self, name: str) -> float:
        return pattern_value(self.alpha_pattern, name, self.lora_alpha)

    def slices_of(self, name: str) -> Optional[tuple[bool, ...]]:
        slices = pattern_value(self.enable_slices, name, None)
        return None if slices is None else tuple(slices)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


OPTIONS = ConfigOptions(LoRAConfig, former_first_field='r')
"""A :class:`LoRAConfig` given as one object or as its fields (``LoRAInject``, :func:`apply_lora`)."""
