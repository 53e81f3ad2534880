"""The tasks and the methods the benchmark compares, each set up through its own public API.

Every method runs in Composer's Trainer on the same model copy, data order, batch budget and eval set:

* ``full``: plain full fine-tuning (AdamW over every parameter).
* Ours: ``LayerFreezing``, ``RegexFreeze``, ``LoRAInject`` and, when its sub-package exists, ``HiFTRotation``.
* Peers: Composer's ``LayerFreezing``; a hand-written ``requires_grad_(False)`` freeze (what users write instead of
  RegexFreeze); PEFT's ``get_peft_model``; ``loralib`` (``loralib.Linear`` swapped in, ``mark_only_lora_as_trainable``);
  BAdam's ``BlockOptimizer`` passed to the Trainer as its optimizer; the ``hift`` package. ``import hift`` fails with
  transformers 4.53 (``hift.trainer`` imports ``is_torch_tpu_available``, ``is_torch_less_than_1_11``), so its
  ``HiFTrainer`` cannot run; we load its grouping module (``hift/registerCallBack.py``) by file and repeat what
  ``HiFTrainer.update_parameter_state`` does before every step in a Composer callback (select the next group with its
  patterns, set ``requires_grad``, rebuild the two param groups; ``optimizer.state`` is kept, as in ``hift``).

A method whose package is missing or broken is still listed, with the reason instead of numbers.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
from composer import Callback, Logger, State
from composer.models import HuggingFaceModel
from torch import nn

from composer_thaw.utils.optimizer_surgery import TrainingStateBytes, optimizer_state_bytes, training_state_bytes
from composer_thaw.utils.parameter_selection import user_module

__all__ = ['METHODS', 'Method', 'Setup', 'Task', 'build_tasks', 'default_batches', 'swap_in_loralib']


@dataclass
class Task:
    """A model, its data and its budget. ``base`` is built once; every run trains a deep copy of it."""

    key: str
    title: str
    base: HuggingFaceModel
    train_loader: Any
    eval_loader: Any
    batch_size: int
    seq_len: int
    lr: float  # full fine-tuning and freezing methods
    adapter_lr: float  # LoRA-style methods: few, zero-initialized parameters need a larger rate
    lora_targets: list[str]
    head: list[str]  # modules that must train for the task to be learnable (the fresh classifier), else []
    top_patterns: list[str]  # what the freezing methods keep trainable: the last block and the head
    block_prefixes: list[str]  # 'bert.encoder.layer.0.' ... for BAdam's block list
    metric: str  # eval metric name
    higher_is_better: bool

    def fresh_model(self) -> HuggingFaceModel:
        return copy.deepcopy(self.base)


def _decoder_task(
    key: str, hidden: int, layers: int, batch_size: int, seq_len: int, train_blocks: int, eval_blocks: int
) -> Task:
    from composer.utils import reproducibility

    from composer_thaw.datasets.builtin import LanguageModelingDataset, build_dataloader, python_topics_corpus
    from composer_thaw.models.builtin import load_tokenizer, tiny_decoder

    tokenizer = load_tokenizer()
    reproducibility.seed_all(0)
    base = tiny_decoder('llama', num_layers=layers, hidden_size=hidden, num_heads=4, max_seq_len=seq_len)
    train_texts, eval_texts = python_topics_corpus()
    train = LanguageModelingDataset(train_texts, tokenizer, seq_len, train_blocks)
    evaluation = LanguageModelingDataset(eval_texts, tokenizer, seq_len, eval_blocks)
    params = sum(p.numel() for p in base.parameters())
    return Task(
        key=key,
        title=f'decoder LM, LLaMA-style, hidden {hidden}, {layers} layers ({params / 1e6:.1f}M params), '
        f'batch {batch_size} x {seq_len} tokens',
        base=base,
        train_loader=build_dataloader(train, tokenizer, batch_size, shuffle=True, drop_last=True),
        eval_loader=build_dataloader(evaluation, tokenizer, batch_size, shuffle=False, drop_last=False),
        batch_size=batch_size,
        seq_len=seq_len,
        lr=1e-3,
        adapter_lr=1e-2,
        lora_targets=['q_proj', 'v_proj'],
        head=[],
        top_patterns=[f'model.layers.{layers - 1}', 'model.norm', 'lm_head'],
        block_prefixes=[f'model.layers.{i}.' for i in range(layers)],
        metric='LanguageCrossEntropy',
        higher_is_better=False,
    )


def _minilm_task(batch_size: int, seq_len: int, train_examples: int, eval_examples: int) -> Task:
    from composer.utils import reproducibility

    from composer_thaw.datasets.builtin import (
        STDLIB_DOCS_CLASSES,
        ClassificationDataset,
        build_dataloader,
        stdlib_docs_examples,
    )
    from composer_thaw.models.builtin import load_tokenizer, minilm_classifier

    tokenizer = load_tokenizer()
    reproducibility.seed_all(0)
    base = minilm_classifier(num_labels=len(STDLIB_DOCS_CLASSES), dropout=0.0)
    train, evaluation = stdlib_docs_examples()
    return Task(
        key='minilm',
        title=f'all-MiniLM-L6-v2 (22.7M params), docstring classification (6 classes), batch {batch_size} x '
        f'{seq_len} tokens',
        base=base,
        train_loader=build_dataloader(
            ClassificationDataset(train[:train_examples], tokenizer, seq_len),
            tokenizer,
            batch_size,
            shuffle=True,
            drop_last=True,
        ),
        eval_loader=build_dataloader(
            ClassificationDataset(evaluation[:eval_examples], tokenizer, seq_len),
            tokenizer,
            64,
            shuffle=False,
            drop_last=False,
        ),
        batch_size=batch_size,
        seq_len=seq_len,
        lr=1e-4,
        adapter_lr=2e-3,
        lora_targets=['query', 'value'],
        head=['classifier'],
        top_patterns=['bert.encoder.layer.5', 'bert.pooler', 'classifier'],
        block_prefixes=[f'bert.encoder.layer.{i}.' for i in range(6)],
        metric='MulticlassAccuracy',
        higher_is_better=True,
    )


def default_batches(quick: bool) -> int:
    """Training batches per run: two epochs, so epoch-end freezing acts once, at the midpoint."""
    return 4 if quick else 40


def build_tasks(quick: bool, only: Optional[list[str]] = None, batches: Optional[int] = None) -> list[Task]:
    """The three tasks: MiniLM classification and the decoder at two sizes. ``quick`` shrinks batches and data."""
    per_epoch = max(1, (batches or default_batches(quick)) // 2)
    batch, seq = (4, 32) if quick else (8, 64)
    minilm_batch, minilm_seq = (8, 32) if quick else (16, 64)
    eval_blocks = 8 if quick else 64
    builders: dict[str, Callable[[], Task]] = {
        'minilm': lambda: _minilm_task(minilm_batch, minilm_seq, per_epoch * minilm_batch, 64 if quick else 256),
        'decoder-s': lambda: _decoder_task('decoder-s', 64, 4, batch, seq, per_epoch * batch, eval_blocks),
        'decoder-m': lambda: _decoder_task('decoder-m', 256, 8, batch, seq, per_epoch * batch, eval_blocks),
    }
    unknown = set(only or ()) - set(builders)
    if unknown:
        raise ValueError(f'unknown task(s) {sorted(unknown)}; choose from {list(builders)}.')
    return [build() for key, build in builders.items() if only is None or key in only]


@dataclass
class Setup:
    """What a method hands the Trainer, and how to count its training state."""

    model: HuggingFaceModel
    optimizer: torch.optim.Optimizer
    algorithms: list = field(default_factory=list)
    callbacks: list = field(default_factory=list)
    count_state: Optional[Callable[[State], TrainingStateBytes]] = None


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    family: Literal['baseline', 'ours', 'peer']
    setup: Callable[[Task, str], Setup]
    closest_peer: Optional[str] = None  # for ours: the key of the peer it replaces
    requires: tuple[str, ...] = ()  # importable modules it needs
    how: str = 'Composer Trainer'
    estimate: Optional[tuple[str, Callable[[Task], dict[str, Any]]]] = None  # (estimator name, options)

    def unavailable(self) -> Optional[str]:
        """Why this method cannot run here, or None."""
        for module in self.requires:
            if module == 'hift':
                return _hift_grouping_unavailable()
            if importlib.util.find_spec(module) is None or importlib.util.find_spec(module).origin is None:
                return f'{module} is not installed'
        return None


def _adamw(params, lr: float, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def _rewrap(task: Task, module: nn.Module) -> HuggingFaceModel:
    """``module`` (a PEFT or edited HF model) wrapped for Composer with the task's tokenizer and metrics."""
    base = task.base
    return HuggingFaceModel(
        module,
        tokenizer=base.tokenizer,
        metrics=list(copy.deepcopy(base.train_metrics).values()),
        eval_metrics=list(copy.deepcopy(base.val_metrics).values()),
        use_logits=True,
    )


# ---- baseline and ours -------------------------------------------------------------------------------------------


def _full(task: Task, device: str) -> Setup:
    model = task.fresh_model()
    return Setup(model, _adamw(model.parameters(), task.lr))


def _ours_layer_freezing(task: Task, device: str) -> Setup:
    from composer_thaw.layer_freezing import LayerFreezing

    model = task.fresh_model()
    return Setup(model, _adamw(model.parameters(), task.lr), [LayerFreezing(freeze_start=0.0, freeze_level=1.0)])


def _ours_regex_freeze(task: Task, device: str) -> Setup:
    from composer_thaw.regex_freeze import RegexFreeze

    model = task.fresh_model()
    return Setup(model, _adamw(model.parameters(), task.lr), [RegexFreeze(trainable=task.top_patterns)])


def _lora_options(task: Task) -> dict[str, Any]:
    options: dict[str, Any] = {'r': 8, 'lora_alpha': 16, 'target_modules': task.lora_targets}
    if task.head:
        options['modules_to_save'] = task.head
    return options


def _ours_lora(task: Task, device: str) -> Setup:
    from composer_thaw.lora_inject import LoRAInject

    model = task.fresh_model()
    return Setup(model, _adamw(model.parameters(), task.adapter_lr), [LoRAInject(**_lora_options(task))])


def _ours_hift(task: Task, device: str) -> Setup:
    from composer_thaw.hift_rotation import HiFTRotation

    model = task.fresh_model()
    return Setup(model, _adamw(model.parameters(), task.lr), [HiFTRotation(group_size=1, strategy='down2up')])


# ---- peers -------------------------------------------------------------------------------------------------------


def _composer_layer_freezing(task: Task, device: str) -> Setup:
    from composer.algorithms import LayerFreezing

    model = task.fresh_model()
    return Setup(model, _adamw(model.parameters(), task.lr), [LayerFreezing(freeze_start=0.0, freeze_level=1.0)])


def _manual_freeze(task: Task, device: str) -> Setup:
    model = task.fresh_model()
    for name, param in user_module(model).named_parameters():
        param.requires_grad_(any(name == p or name.startswith(p + '.') for p in task.top_patterns))
    return Setup(model, _adamw([p for p in model.parameters() if p.requires_grad], task.lr))


def _peft_lora(task: Task, device: str) -> Setup:
    import peft

    options = _lora_options(task)
    config = peft.LoraConfig(
        r=options['r'],
        lora_alpha=options['lora_alpha'],
        target_modules=options['target_modules'],
        modules_to_save=options.get('modules_to_save'),
        lora_dropout=0.0,
    )
    model = _rewrap(task, peft.get_peft_model(user_module(task.fresh_model()), config))
    return Setup(model, _adamw([p for p in model.parameters() if p.requires_grad], task.adapter_lr))


def swap_in_loralib(model: nn.Module, targets: list[str], r: int, lora_alpha: int) -> nn.Module:
    """Replace each ``nn.Linear`` whose last name part is in ``targets`` by ``loralib.Linear`` (same weights), and
    mark only the LoRA parameters trainable, as loralib's README does."""
    import loralib

    for name, module in list(model.named_modules()):
        if name.rsplit('.', 1)[-1] in targets and isinstance(module, nn.Linear):
            layer = loralib.Linear(
                module.in_features, module.out_features, r=r, lora_alpha=lora_alpha, bias=module.bias is not None
            ).to(module.weight.device)
            layer.load_state_dict(module.state_dict(), strict=False)
            parent, _, child = name.rpartition('.')
            setattr(model.get_submodule(parent), child, layer)
    loralib.mark_only_lora_as_trainable(model)
    return model


def _loralib(task: Task, device: str) -> Setup:
    model = task.fresh_model()
    hf = swap_in_loralib(user_module(model), task.lora_targets, r=8, lora_alpha=16)
    for name, param in hf.named_parameters():
        if any(name.startswith(h + '.') for h in task.head):
            param.requires_grad_(True)
    return Setup(model, _adamw([p for p in model.parameters() if p.requires_grad], task.adapter_lr))


def _badam(task: Task, device: str) -> Setup:
    import warnings

    model = task.fresh_model()
    if device == 'gpu':
        model = model.cuda()  # BlockOptimizer copies the active block on construction: copy it where it trains
    hf = user_module(model)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter('ignore')  # "BAdam expect model to be loaded in fp16/bf16" (we train fp32, like all rows)
        optimizer = _closure_first(
            base_optimizer=_adamw(hf.parameters(), task.lr),
            named_parameters_list=list(hf.named_parameters()),
            block_prefix_list=[[prefix] for prefix in task.block_prefixes],
            switch_block_every=1,
            switch_mode='ascending',
            active_modules=list(task.head),
            verbose=0,
        )

    def count_state(state: State) -> TrainingStateBytes:
        # Its base optimizer's state is keyed by fp32 copies of the active block (BlockOptimizer.state is empty);
        # the copies are optimizer-held memory too.
        counts = training_state_bytes(state.model, None)
        copies = sum(p.numel() * p.element_size() for p in optimizer.param_idx2hp.values())
        return TrainingStateBytes(counts.params, counts.grads, optimizer_state_bytes(optimizer.base_optimizer) + copies)

    return Setup(model, optimizer, callbacks=[_QuietBAdam()], count_state=count_state)


def _closure_first(**kwargs: Any):
    """BAdam's ``BlockOptimizer``, taking Composer's closure: Composer always calls ``optimizer.step(closure)`` (in
    fp32), but ``BlockOptimizer.step`` copies the gradients to its fp32 block before it would run the closure, so it
    fails ("The low precision parameter's gradient is None"). This subclass runs the closure first, then BAdam's
    step."""
    from badam import BlockOptimizer

    class ClosureFirstBlockOptimizer(BlockOptimizer):
        def step(self, closure=None):  # type: ignore[override]
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            super().step()
            return loss

    return ClosureFirstBlockOptimizer(**kwargs)


class _QuietBAdam(Callback):
    """BlockOptimizer prints the active block at every switch; keep the benchmark's output readable."""

    def fit_start(self, state: State, logger: Logger) -> None:
        self._sink = contextlib.redirect_stdout(io.StringIO())
        self._sink.__enter__()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._sink.__exit__(None, None, None)


@contextlib.contextmanager
def _quiet():
    """Silence a peer's prints and Hugging Face warnings."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        hf_logging.set_verbosity(verbosity)


def _hift_register_module():
    """``hift/registerCallBack.py`` loaded by file: ``import hift`` itself fails on transformers 4.53."""
    spec = importlib.util.find_spec('hift')
    if spec is None or spec.origin is None:
        raise ImportError('hift is not installed')
    path = Path(spec.origin).parent / 'registerCallBack.py'
    module_spec = importlib.util.spec_from_file_location('_hift_register_callback', path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def _hift_grouping_unavailable() -> Optional[str]:
    try:
        _hift_register_module()
    except Exception as error:
        return f'hift cannot be loaded: {type(error).__name__}: {error}'
    return None


class HiFTPackageRotation(Callback):
    """Before every step, what ``hift.HiFTrainer.update_parameter_state`` does (group_element=1, down2up)."""

    def __init__(self, handler: Any, group_element: int = 1) -> None:
        self.handler = handler
        self.group_element = group_element
        self.groups: Optional[list[str]] = None

    def before_train_batch(self, state: State, logger: Logger) -> None:
        from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
        from transformers.trainer_pt_utils import get_parameter_names

        model = user_module(state.model)
        if self.groups is None:
            with _quiet():  # group_model prints the groups
                self.groups = self.handler.group_model(model)
        elements = self.groups[: self.group_element]  # HiFTrainer.select_element: take from the head, move to tail
        self.groups = self.groups[self.group_element :] + elements
        pattern = '|'.join(self.handler.pattern_list)
        for name, param in model.named_parameters():
            param.requires_grad = self.handler.check_selection(elements, re.compile(pattern).findall(name))
        decay = [n for n in get_parameter_names(model, ALL_LAYERNORM_LAYERS) if 'bias' not in n]
        optimizer = state.optimizers[0]
        hyper = [{k: v for k, v in group.items() if k != 'params'} for group in optimizer.param_groups]
        named = list(model.named_parameters())
        optimizer.param_groups = [
            {**hyper[0], 'params': [p for n, p in named if n in decay and p.requires_grad]},
            {**hyper[-1], 'params': [p for n, p in named if n not in decay and p.requires_grad]},
        ]


def _hift_package(task: Task, device: str) -> Setup:
    from peft import TaskType
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    register = _hift_register_module()
    model = task.fresh_model()
    hf = user_module(model)
    with _quiet():  # the handlers log which task types they accept
        if task.head:  # BERT sequence classification
            handler = register.BERTCallBack([], 'down2up', TaskType.SEQ_CLS)
        else:
            handler = register.LLaMaFamilyCallBack([], 'down2up', TaskType.CAUSAL_LM)
    decay = {n for n in get_parameter_names(hf, ALL_LAYERNORM_LAYERS) if 'bias' not in n}
    named = list(hf.named_parameters())
    optimizer = torch.optim.AdamW(
        [
            {'params': [p for n, p in named if n in decay], 'weight_decay': 0.01},
            {'params': [p for n, p in named if n not in decay], 'weight_decay': 0.0},
        ],
        lr=task.lr,
    )
    return Setup(model, optimizer, callbacks=[HiFTPackageRotation(handler)])


def _lora_estimate(task: Task) -> dict[str, Any]:
    return _lora_options(task)


METHODS: tuple[Method, ...] = (
    Method('full', 'full fine-tuning (AdamW)', 'baseline', _full, estimate=('full', lambda t: {})),
    Method(
        'layer_freezing',
        'ours: LayerFreezing',
        'ours',
        _ours_layer_freezing,
        closest_peer='composer_lf',
        estimate=('layer_freezing', lambda t: {'freeze_start': 0.0, 'freeze_level': 1.0}),
    ),
    Method('composer_lf', 'Composer LayerFreezing', 'peer', _composer_layer_freezing),
    Method(
        'regex_freeze',
        'ours: RegexFreeze',
        'ours',
        _ours_regex_freeze,
        closest_peer='manual_freeze',
        estimate=('regex_freeze', lambda t: {'trainable': t.top_patterns}),
    ),
    Method('manual_freeze', 'requires_grad_(False) by hand', 'peer', _manual_freeze),
    Method(
        'lora_inject',
        'ours: LoRAInject r=8',
        'ours',
        _ours_lora,
        closest_peer='peft_lora',
        estimate=('lora_inject', _lora_estimate),
    ),
    Method('peft_lora', 'PEFT LoRA r=8', 'peer', _peft_lora, requires=('peft',)),
    Method('loralib', 'loralib r=8', 'peer', _loralib, requires=('loralib',)),
    Method(
        'hift_rotation',
        'ours: HiFTRotation',
        'ours',
        _ours_hift,
        closest_peer='hift_package',
        requires=('composer_thaw.hift_rotation',),
        estimate=('hift_rotation', lambda t: {'group_size': 1}),
    ),
    Method(
        'hift_package',
        'hift 0.0.5 (grouping + rotation)',
        'peer',
        _hift_package,
        requires=('hift',),
        how='`import hift` fails on transformers 4.53 (it imports the removed `is_torch_tpu_available`), so '
        'its grouping module (`hift/registerCallBack.py`) is loaded by file and what `HiFTrainer.'
        'update_parameter_state` does before each step is repeated in a Composer callback (group_element=1, '
        "down2up); like hift, it keeps every visited group's optimizer state in the optimizer",
    ),
    Method(
        'badam',
        'BAdam BlockOptimizer, switch every step',
        'peer',
        _badam,
        requires=('badam',),
        how='`BlockOptimizer` (switch_block_every=1, ascending, to rotate like HiFT within the budget) is the '
        "Trainer's optimizer, in a subclass that runs Composer's closure before BAdam's step; BAdam copies "
        'the active block to fp32 and calls `gc.collect()` at every switch',
    ),
)
