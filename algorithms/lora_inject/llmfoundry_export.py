"""llm-foundry's Hugging Face export for LoRA runs: the ``merged_hf_checkpointer`` callback.

llm-foundry's ``hf_checkpointer`` loads the trained model's ``state_dict()`` strictly into a fresh model of the same
class, which has no adapter keys. :class:`MergedHuggingFaceCheckpointer` is that callback (the same options), with the
adapters merged into the weights it exports, for the duration of each export only
(:func:`~composer_thaw.lora_inject.peft_format.merged_state_dict_view`): elsewhere the Hugging Face model's
``state_dict()`` is its own, adapters included. composer-thaw registers it with llm-foundry under the entry-point group
``llmfoundry_callbacks``; ``LoRAInject`` refuses the plain ``hf_checkpointer`` before training, naming this one.

Example (an llm-foundry train YAML):
    callbacks:
      merged_hf_checkpointer: {save_folder: ./hf-export, save_interval: 1ep, precision: float32}
"""

from __future__ import annotations

from typing import Any

from composer.core import State
from llmfoundry.callbacks.hf_checkpointer import HuggingFaceCheckpointer

from composer_thaw.lora_inject.lora_inject import MERGED_EXPORT
from composer_thaw.lora_inject.peft_format import merged_state_dict_view
from composer_thaw.utils.adapters import has_adapters
from composer_thaw.utils.parameter_selection import user_module

__all__ = ['REGISTERED_NAME', 'MergedHuggingFaceCheckpointer']

REGISTERED_NAME = MERGED_EXPORT


class MergedHuggingFaceCheckpointer(HuggingFaceCheckpointer):
    """llm-foundry's ``hf_checkpointer`` that exports a LoRA-adapted model as the plain model with its adapters
    merged in (a model without adapters is exported as ``hf_checkpointer`` exports it)."""

    def _save_checkpoint(self, state: State, *args: Any, **kwargs: Any) -> Any:
        if not has_adapters(user_module(state.model)):
            return super()._save_checkpoint(state, *args, **kwargs)
        with merged_state_dict_view(state.model):
            return super()._save_checkpoint(state, *args, **kwargs)
