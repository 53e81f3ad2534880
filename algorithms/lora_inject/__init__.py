"""LoRAInject: low-rank adapters (LoRA, DoRA, rsLoRA, PiSSA) injected as Composer model surgery, interchangeable
with PEFT's adapter files.

Example:
    >>> from composer_thaw.lora_inject import LoRAInject, apply_lora
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> model = tiny_decoder(num_layers=2)
    >>> summary = apply_lora(model, r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'])  # without a Trainer
    >>> len(summary.adapted), summary.trainable_params
    (4, 4096)
    >>> LoRAInject(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'])  # with one: Trainer(algorithms=[...])
    LoRAInject(lora_alpha=16, target_modules=['q_proj', 'v_proj'])
"""

from composer_thaw.lora_inject.config import DEFAULT_TARGET_MODULES, LoRAConfig
from composer_thaw.lora_inject.layers import LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear
from composer_thaw.lora_inject.lora_inject import LoRAInject
from composer_thaw.lora_inject.peft_format import (
    adapter_state_dict,
    export_merged,
    expose_merged_state_dict,
    load_adapter,
    load_adapter_state_dict,
    merged_state_dict_view,
    save_adapter,
)
from composer_thaw.lora_inject.surgery import (
    LoRASummary,
    apply_lora,
    freeze_outside_adapters,
    frozen_base_parameters,
    lora_config_of,
    merge_adapters,
    unmerge_adapters,
)

__all__ = [
    'DEFAULT_TARGET_MODULES',
    'LoRAConfig',
    'LoRAConv',
    'LoRAEmbedding',
    'LoRAInject',
    'LoRALayer',
    'LoRALinear',
    'LoRASummary',
    'adapter_state_dict',
    'apply_lora',
    'export_merged',
    'expose_merged_state_dict',
    'freeze_outside_adapters',
    'frozen_base_parameters',
    'load_adapter',
    'load_adapter_state_dict',
    'lora_config_of',
    'merge_adapters',
    'merged_state_dict_view',
    'save_adapter',
    'unmerge_adapters',
]
