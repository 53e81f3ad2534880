"""Tiny models of many architectures, built from configs (nothing is downloaded), for tests across model families.

``ARCHITECTURES`` holds the Hugging Face ones (decoder-only with and without tied embeddings, GPT-2's ``Conv1D``,
encoder-only classifiers, encoder-decoders), ``VISION`` two torchvision classifiers. Each builds in milliseconds
(hidden size 16, 2 layers, vocabulary 64) from a fixed seed; :func:`batch` makes a matching training batch and
:func:`loss` the training loss.

Example:
    >>> arch = ARCHITECTURES['opt']
    >>> model = arch.build()
    >>> loss(model, batch(arch)).backward()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import nn

__all__ = ['ARCHITECTURES', 'VISION', 'Architecture', 'batch', 'loss']

Family = Literal['decoder', 'encoder', 'encoder-decoder', 'vision']
VOCAB = 64
_SMALL = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32, vocab_size=VOCAB)


@dataclass(frozen=True)
class Architecture:
    """A tiny model of one architecture.

    Attributes:
        name: the Hugging Face ``model_type`` (or the torchvision model's name).
        family: ``'decoder'`` (causal LM), ``'encoder'`` (sequence classifier, 3 labels), ``'encoder-decoder'``
            (seq2seq LM) or ``'vision'`` (image classifier, 3 classes).
        tied: the input embedding is the output head's weight.
        hift: ``(name, task)`` for the ``hift`` package's ``GetCallBack(name)`` where it has a grouping made for
            this architecture's parameter names, else ``None``.
        make: builds the model (use :meth:`build`, which seeds).
    """

    name: str
    family: Family
    tied: bool
    hift: Optional[tuple[str, str]]
    make: Callable[[], nn.Module]

    def build(self, seed: int = 0) -> nn.Module:
        """The model, freshly initialized from ``seed``, in training mode (dropout is 0 where configurable)."""
        torch.manual_seed(seed)
        return self.make().train()


def _hf(config_name: str, model_name: str, **config: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import transformers

        return getattr(transformers, model_name)(getattr(transformers, config_name)(**config))

    return make


_NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)

ARCHITECTURES: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        Architecture(
            'llama',
            'decoder',
            False,
            ('llama', 'CAUSAL_LM'),
            _hf('LlamaConfig', 'LlamaForCausalLM', num_key_value_heads=1, **_SMALL),
        ),
        Architecture(
            'qwen2',
            'decoder',
            True,
            ('llama', 'CAUSAL_LM'),  # hift's LLaMA-family grouping: same parameter names
            _hf('Qwen2Config', 'Qwen2ForCausalLM', num_key_value_heads=1, tie_word_embeddings=True, **_SMALL),
        ),
        Architecture(
            'gemma',
            'decoder',
            True,
            ('llama', 'CAUSAL_LM'),
            _hf('GemmaConfig', 'GemmaForCausalLM', num_key_value_heads=1, head_dim=8, **_SMALL),
        ),
        Architecture('phi', 'decoder', False, None, _hf('PhiConfig', 'PhiForCausalLM', resid_pdrop=0.0, **_SMALL)),
        Architecture(
            'gpt2',
            'decoder',
            True,
            ('gpt2', 'CAUSAL_LM'),
            _hf(
                'GPT2Config',
                'GPT2LMHeadModel',
                n_embd=16,
                n_layer=2,
                n_head=2,
                vocab_size=VOCAB,
                n_positions=32,
                resid_pdrop=0.0,
                embd_pdrop=0.0,
                attn_pdrop=0.0,
            ),
        ),
        Architecture(
            'gpt_neox',
            'decoder',
            False,
            None,  # hift's GPTNeoXCallBack patterns (wte/wpe, ln_f) are GPT-Neo's names: they match no GPT-NeoX one
            _hf('GPTNeoXConfig', 'GPTNeoXForCausalLM', **_SMALL),
        ),
        Architecture(
            'gpt_neo',
            'decoder',
            True,
            ('gpt-neo', 'CAUSAL_LM'),
            _hf(
                'GPTNeoConfig',
                'GPTNeoForCausalLM',
                hidden_size=16,
                num_layers=2,
                num_heads=2,
                vocab_size=VOCAB,
                max_position_embeddings=32,
                attention_types=[[['global', 'local'], 1]],
                resid_dropout=0.0,
                embed_dropout=0.0,
                attention_dropout=0.0,
            ),
        ),
        Architecture(
            'opt',
            'decoder',
            True,
            ('opt', 'CAUSAL_LM'),
            _hf(
                'OPTConfig',
                'OPTForCausalLM',
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                ffn_dim=32,
                vocab_size=VOCAB,
                max_position_embeddings=32,
                word_embed_proj_dim=16,
                dropout=0.0,
            ),
        ),
        Architecture(
            'bloom',
            'decoder',
            True,
            None,
            _hf('BloomConfig', 'BloomForCausalLM', hidden_size=16, n_layer=2, n_head=2, vocab_size=VOCAB),
        ),
        Architecture(
            'falcon',
            'decoder',
            True,
            None,
            _hf(
                'FalconConfig',
                'FalconForCausalLM',
                hidden_size=16,
                num_hidden_layers=2,
                num_attention_heads=2,
                vocab_size=VOCAB,
            ),
        ),
        Architecture(
            'bert',
            'encoder',
            False,
            ('bert', 'SEQ_CLS'),
            _hf('BertConfig', 'BertForSequenceClassification', num_labels=3, **_NO_DROPOUT, **_SMALL),
        ),
        Architecture(
            'roberta',
            'encoder',
            False,
            ('roberta', 'SEQ_CLS'),
            _hf(
                'RobertaConfig',
                'RobertaForSequenceClassification',
                num_labels=3,
                max_position_embeddings=40,
                **_NO_DROPOUT,
                **_SMALL,
            ),
        ),
        Architecture(
            'distilbert',
            'encoder',
            False,
            None,  # GetCallBack('distilbert') returns BERT's by substring, which merges pre_classifier into classifier
            _hf(
                'DistilBertConfig',
                'DistilBertForSequenceClassification',
                dim=16,
                n_layers=2,
                n_heads=2,
                hidden_dim=32,
                vocab_size=VOCAB,
                max_position_embeddings=32,
                num_labels=3,
                dropout=0.0,
                attention_dropout=0.0,
                seq_classif_dropout=0.0,
            ),
        ),
        Architecture(
            'deberta-v2',
            'encoder',
            False,
            None,
            _hf(
                'DebertaV2Config',
                'DebertaV2ForSequenceClassification',
                num_labels=3,
                relative_attention=True,
                pos_att_type=['p2c', 'c2p'],
                position_buckets=8,
                **_NO_DROPOUT,
                **_SMALL,
            ),
        ),
        Architecture(
            't5',
            'encoder-decoder',
            True,
            None,
            _hf(
                'T5Config',
                'T5ForConditionalGeneration',
                d_model=16,
                d_kv=8,
                d_ff=32,
                num_layers=2,
                num_heads=2,
                vocab_size=VOCAB,
                dropout_rate=0.0,
                decoder_start_token_id=0,
            ),
        ),
        Architecture(
            'bart',
            'encoder-decoder',
            True,
            None,
            _hf(
                'BartConfig',
                'BartForConditionalGeneration',
                d_model=16,
                encoder_layers=2,
                decoder_layers=2,
                encoder_attention_heads=2,
                decoder_attention_heads=2,
                encoder_ffn_dim=32,
                decoder_ffn_dim=32,
                vocab_size=VOCAB,
                max_position_embeddings=32,
                dropout=0.0,
            ),
        ),
    )
}


def _resnet() -> nn.Module:
    from torchvision.models.resnet import BasicBlock, ResNet

    model = ResNet(BasicBlock, [2, 2, 2, 2], num_classes=3, width_per_group=64)
    return model


def _vit() -> nn.Module:
    from torchvision.models import VisionTransformer

    return VisionTransformer(
        image_size=16, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=3
    )


VISION: dict[str, Architecture] = {
    'resnet18': Architecture('resnet18', 'vision', False, None, _resnet),
    'vit': Architecture('vit', 'vision', False, None, _vit),
}


def batch(arch: Architecture, batch_size: int = 2, length: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """A training batch for ``arch``: token ids with labels (the ids for LMs, a class for classifiers), or images."""
    generator = torch.Generator().manual_seed(seed)
    if arch.family == 'vision':
        size = 16 if arch.name == 'vit' else 32
        return {
            'images': torch.randn(batch_size, 3, size, size, generator=generator),
            'labels': torch.randint(0, 3, (batch_size,), generator=generator),
        }
    ids = torch.randint(4, VOCAB, (batch_size, length), generator=generator)
    if arch.family == 'encoder':
        labels = torch.randint(0, 3, (batch_size,), generator=generator)
        return {'input_ids': ids, 'attention_mask': torch.ones_like(ids), 'labels': labels}
    return {'input_ids': ids, 'labels': ids.clone()}


def loss(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's training loss on ``inputs`` (from :func:`batch`)."""
    if 'images' in inputs:
        return nn.functional.cross_entropy(model(inputs['images']), inputs['labels'])
    return model(**inputs).loss


def outputs(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The model's logits on ``inputs``."""
    if 'images' in inputs:
        return model(inputs['images'])
    return model(**inputs).logits
