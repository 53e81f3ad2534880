"""Built-in data sets made from text that ships with Python, so nothing is downloaded.

* :func:`stdlib_docs_examples`: a 6-class classification task. Each example is a paragraph of a docstring
  from one standard-library package (``asyncio``, ``email``, ``http``, ``logging``, ``unittest``, ``xml``),
  labelled by that package. The split is by a hash of the text, so it is fixed whatever the order of discovery.
* :func:`python_topics_corpus`: the Python reference documentation topics in ``pydoc_data.topics``, for
  causal language modelling, split by a hash of the text.

Both feed :func:`build_dataloader`, which uses Composer's distributed sampler so multi-process runs split the
data and resumed runs replay it exactly.

Example:
    >>> train, eval_ = stdlib_docs_examples()
    >>> train[0].label in range(len(STDLIB_DOCS_CLASSES))
    True
    >>> from composer_thaw.models.builtin import load_tokenizer
    >>> loader = python_topics_loader(load_tokenizer(), batch_size=4, max_seq_len=32, max_blocks=8)
    >>> len(loader), next(iter(loader))['input_ids'].shape
    (2, torch.Size([4, 32]))
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import pkgutil
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any, Optional

import torch
from composer.utils import dist
from torch.utils.data import DataLoader, Dataset

__all__ = [
    'STDLIB_DOCS_CLASSES',
    'ClassificationDataset',
    'LanguageModelingDataset',
    'TextExample',
    'build_dataloader',
    'python_topics_corpus',
    'python_topics_loader',
    'stdlib_docs_examples',
]

STDLIB_DOCS_CLASSES = ('asyncio', 'email', 'http', 'logging', 'unittest', 'xml')
_EVAL_FRACTION = 0.2
_MIN_CHARS, _MAX_CHARS = 40, 600


@dataclass(frozen=True)
class TextExample:
    text: str
    label: int


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], 'big')


def _is_eval(text: str) -> bool:
    return _digest(text) % 1000 < _EVAL_FRACTION * 1000


def _package_modules(package_name: str) -> list[Any]:
    package = importlib.import_module(package_name)
    modules = [package]
    for info in sorted(pkgutil.walk_packages(package.__path__, package_name + '.'), key=lambda m: m.name):
        if '.test' in info.name or info.name.endswith('__main__'):
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                modules.append(importlib.import_module(info.name))
        except Exception:  # optional platform modules (e.g. needing a missing C library) are skipped
            continue
    return modules


def _docstring_paragraphs(package_name: str) -> set[str]:
    paragraphs: set[str] = set()
    for module in _package_modules(package_name):
        documented: list[Any] = [module]
        for _, obj in sorted(vars(module).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(
                obj, '__module__', None
            ) == module.__name__:
                documented.append(obj)
                if inspect.isclass(obj):
                    documented += [m for _, m in sorted(vars(obj).items()) if inspect.isfunction(m)]
        for obj in documented:
            doc = inspect.getdoc(obj)
            for paragraph in re.split(r'\n\s*\n', doc or ''):
                text = ' '.join(paragraph.split())
                if _MIN_CHARS <= len(text) <= _MAX_CHARS:
                    paragraphs.add(text)
    return paragraphs


@cache
def stdlib_docs_examples(max_per_class: int = 280) -> tuple[tuple[TextExample, ...], tuple[TextExample, ...]]:
    """The docstring-classification task: ``(train, eval)`` examples, balanced, at most ``max_per_class`` each.

    A paragraph found in two packages is dropped (its label would be ambiguous).
    """
    by_class = [_docstring_paragraphs(name) for name in STDLIB_DOCS_CLASSES]
    counts: dict[str, int] = {}
    for paragraphs in by_class:
        for text in paragraphs:
            counts[text] = counts.get(text, 0) + 1
    train: list[TextExample] = []
    eval_: list[TextExample] = []
    for label, paragraphs in enumerate(by_class):
        unique = sorted((t for t in paragraphs if counts[t] == 1), key=_digest)[:max_per_class]
        for text in unique:
            (eval_ if _is_eval(text) else train).append(TextExample(text, label))
    train.sort(key=lambda e: _digest(e.text))
    eval_.sort(key=lambda e: _digest(e.text))
    return tuple(train), tuple(eval_)


@cache
def python_topics_corpus() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The Python documentation topics as ``(train_texts, eval_texts)``: distinct texts, split by a hash of the text."""
    from pydoc_data.topics import topics

    train: list[str] = []
    eval_: list[str] = []
    for text in sorted(set(topics.values()), key=_digest):
        (eval_ if _is_eval(text) else train).append(text)
    return tuple(train), tuple(eval_)


class ClassificationDataset(Dataset):
    """Tokenized :class:`TextExample` items (``input_ids``, ``attention_mask``, ``labels``), unpadded."""

    def __init__(self, examples: Sequence[TextExample], tokenizer, max_seq_len: int):
        encoded = tokenizer([e.text for e in examples], truncation=True, max_length=max_seq_len)
        self.items = [
            {
                'input_ids': ids,
                'attention_mask': mask,
                'labels': example.label,
            }
            for ids, mask, example in zip(encoded['input_ids'], encoded['attention_mask'], examples)
        ]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.items[index]


class LanguageModelingDataset(Dataset):
    """Texts tokenized, concatenated and cut into blocks of ``max_seq_len`` tokens (labels = inputs)."""

    def __init__(self, texts: Sequence[str], tokenizer, max_seq_len: int, max_blocks: int | None = None):
        ids: list[int] = []
        needed = None if max_blocks is None else max_blocks * max_seq_len
        for text in texts:
            if needed is not None and len(ids) >= needed:
                break
            ids += tokenizer(text, add_special_tokens=False, verbose=False)['input_ids'] + [tokenizer.sep_token_id]
        usable = len(ids) // max_seq_len * max_seq_len
        self.blocks = torch.tensor(ids[:usable], dtype=torch.long).view(-1, max_seq_len)
        if max_blocks is not None:
            self.blocks = self.blocks[:max_blocks]

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, index: int) -> dict[str, Any]:
        block = self.blocks[index]
        return {'input_ids': block, 'attention_mask': torch.ones_like(block), 'labels': block.clone()}


def build_dataloader(
    dataset: Dataset, tokenizer, batch_size: int, shuffle: bool, drop_last: bool, collate_fn: Optional[Callable] = None
) -> DataLoader:
    """A loader over ``dataset`` with Composer's distributed sampler and dynamic padding.

    ``batch_size`` is per process; ``collate_fn`` defaults to padding with ``tokenizer``.
    """
    from transformers import DataCollatorWithPadding

    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=dist.get_sampler(dataset, shuffle=shuffle, drop_last=drop_last),
        collate_fn=collate_fn or DataCollatorWithPadding(tokenizer),
        drop_last=drop_last,
    )


def python_topics_loader(
    tokenizer, batch_size: int = 4, max_seq_len: int = 32, max_blocks: Optional[int] = 64, train: bool = True
) -> DataLoader:
    """A loader of :class:`LanguageModelingDataset` blocks of :func:`python_topics_corpus` (its training texts, or
    its evaluation texts when ``train`` is false) tokenized by ``tokenizer``: a few batches for a causal LM, such as
    the built-in :func:`~composer_thaw.models.builtin.tiny_decoder` (``python_topics_loader(model.tokenizer)``)."""
    dataset = LanguageModelingDataset(python_topics_corpus()[0 if train else 1], tokenizer, max_seq_len, max_blocks)
    return build_dataloader(dataset, tokenizer, batch_size, shuffle=train, drop_last=train)
