"""Shared set-up for the layer freezing tests: tiny decoders, a small LM data loader, and a Trainer factory."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from composer import Callback, Trainer
from composer.core import State
from composer.loggers import Logger

from composer_thaw.datasets.builtin import LanguageModelingDataset, build_dataloader, python_topics_corpus
from composer_thaw.models.builtin import load_tokenizer, tiny_decoder
from composer_thaw.utils.parameter_selection import user_module

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')


def frozen_names(model: torch.nn.Module) -> list[str]:
    """Names of the parameters that no longer require grad, in registration order."""
    return [name for name, p in user_module(model).named_parameters() if not p.requires_grad]


class FrozenRecorder(Callback):
    """Records which parameters are frozen after every epoch (or batch) end; callbacks run after algorithms."""

    def __init__(self, every_batch: bool = False):
        self.every_batch = every_batch
        self.frozen: list[list[str]] = []

    def epoch_end(self, state: State, logger: Logger) -> None:
        if not self.every_batch:
            self.frozen.append(frozen_names(state.model))

    def batch_end(self, state: State, logger: Logger) -> None:
        if self.every_batch:
            self.frozen.append(frozen_names(state.model))


@pytest.fixture(scope='session')
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope='session')
def lm_dataset(tokenizer):
    return LanguageModelingDataset(python_topics_corpus()[0], tokenizer, max_seq_len=32, max_blocks=16)


@pytest.fixture
def make_model() -> Callable[..., Any]:
    def make(
        arch: str = 'llama',
        num_layers: int = 2,
        hidden_size: int = 32,
        tie_word_embeddings: bool = False,
        seed: int = 0,
    ):
        torch.manual_seed(seed)
        return tiny_decoder(
            arch, num_layers=num_layers, hidden_size=hidden_size, num_heads=4, tie_word_embeddings=tie_word_embeddings
        )

    return make


@pytest.fixture
def make_trainer(tokenizer, lm_dataset) -> Callable[..., Trainer]:
    """A CPU Trainer over 4 batches of 4 sequences per epoch, with AdamW (weight decay on) and a fixed seed."""

    def make(model, algorithms=(), max_duration: str = '4ep', batch_size: int = 4, **kwargs) -> Trainer:
        loader = build_dataloader(lm_dataset, tokenizer, batch_size=batch_size, shuffle=False, drop_last=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        return Trainer(
            model=model,
            train_dataloader=loader,
            max_duration=max_duration,
            optimizers=optimizer,
            algorithms=list(algorithms),
            device='cpu',
            progress_bar=False,
            log_to_console=False,
            seed=17,
            **kwargs,
        )

    return make
