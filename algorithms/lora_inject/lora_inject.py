"""LoRA as Composer model surgery: :func:`apply_lora` (functional) and :class:`LoRAInject` (the algorithm).

Example:
    >>> from composer import Trainer
    >>> from composer_thaw.datasets.builtin import python_topics_loader
    >>> from composer_thaw.lora_inject import LoRAConfig, LoRAInject
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> model = tiny_decoder(num_layers=2)
    >>> trainer = Trainer(model=model, train_dataloader=python_topics_loader(model.tokenizer), max_duration='2ba',
    ...                   algorithms=[LoRAInject(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj'])],
    ...                   progress_bar=False)
    >>> trainer.fit()
    >>> sorted({name.rpartition('.')[2] for name, p in model.named_parameters() if p.requires_grad})
    ['lora_A', 'lora_B']
    >>> LoRAInject(LoRAConfig(r=8, lora_alpha=16, target_modules=['q_proj', 'v_proj']))  # PEFT's way, the same
    LoRAInject(lora_alpha=16, target_modules=['q_proj', 'v_proj'])

Resuming: Composer only re-applies its own surgery algorithms on checkpoint load, so pass the same
``LoRAInject(...)`` to the Trainer that loads a checkpoint written with it.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Literal, Optional

from composer.core import Event, State
from composer.loggers import Logger
from composer.utils import dist, reproducibility
from composer.utils.parallelism import FSDP2Config
from torch import nn
from torch.optim import Optimizer

from composer_thaw.core.compatibility import ADAPTERS, BASE_PARAMETERS, Claim
from composer_thaw.lora_inject.config import OPTIONS, LoRAConfig
from composer_thaw.lora_inject.injection import adapter_layers
from composer_thaw.lora_inject.layers import adapter_class_for
from composer_thaw.lora_inject.peft_format import export_merged, save_adapter
from composer_thaw.lora_inject.resume import refuse_adapters_of_another_rank
from composer_thaw.lora_inject.surgery import (
    LoRASummary,
    adapters_in_base_dtype,
    apply_lora,
    freeze_outside_adapters,
    frozen_base_parameters,
    inject_adapters,
    lora_config_of,
    merge_adapters,
    trainable_parameter_names,
    unmerge_adapters,
)
from composer_thaw.utils.master_weights import MasterWeightsOption
from composer_thaw.utils.memory import EstimateSettings, MemoryPlan, resident_plan
from composer_thaw.utils.parameter_selection import user_module
from composer_thaw.utils.thaw_algorithm import ThawAlgorithm
from composer_thaw.utils.trainable_checkpoints import install_for_trainer

log = logging.getLogger(__name__)

# The llm-foundry callback that exports the merged model (composer_thaw.lora_inject.llmfoundry_export, registered
# under that name; its module imports llm-foundry, which this one must not need).
MERGED_EXPORT = 'merged_hf_checkpointer'

__all__ = [
    'LoRAInject',
    'LoRASummary',
    'apply_lora',
    'estimate_memory',
    'freeze_outside_adapters',
    'frozen_base_parameters',
    'lora_config_of',
    'merge_adapters',
    'trainable_parameter_names',
    'unmerge_adapters',
]

# Valid on tiny_decoder('llama', num_layers=4); the conformance suite runs each.
EXAMPLES: tuple[dict[str, Any], ...] = (
    {'r': 4, 'lora_alpha': 8, 'target_modules': ['q_proj', 'v_proj']},
    {
        'r': 4,
        'lora_alpha': 4,
        'target_modules': ['q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', 'up_proj', 'down_proj'],
        'use_dora': True,
        'layers_to_transform': [2, 3],
    },
    {
        'r': 2,
        'lora_alpha': 4,
        'target_modules': ['embed_tokens', 'o_proj'],
        'use_rslora': True,
        'rank_pattern': {'o_proj': 4},
        'bias': 'all',
    },
)


def _check_base_layers_kept(root: nn.Module, config: LoRAConfig, save_merged: bool) -> None:
    """After INIT-time surgery by other algorithms: a base layer replaced by a type LoRA cannot adapt (Factorize's
    ``FactorizedLinear``) still works under plain LoRA (its forward is used as is), but has no weight for DoRA or for
    merging."""
    replaced = {
        name: type(layer.base_layer).__name__
        for name, layer in adapter_layers(root).items()
        if adapter_class_for(layer.base_layer) is None
    }
    if replaced and (config.use_dora or save_merged):
        what = 'use_dora=True needs' if config.use_dora else 'save_merged_to needs'
        raise ValueError(
            f'Another algorithm replaced base layers of LoRA adapters ({replaced}); {what} their weight matrix. '
            'Leave these modules out of the other algorithm, or out of LoRA (put LoRAInject after it and choose '
            'target_modules that it did not replace).',
        )
    if replaced:
        log.info('LoRA: base layers replaced by another algorithm after injection (kept frozen): %s', replaced)


def _refuse_plain_hf_checkpointer(state: State) -> None:
    """llm-foundry's ``hf_checkpointer`` would load the adapted model's keys strictly into a plain model and fail at
    its first export, after training: refuse it before, naming the callback that merges the adapters."""
    for callback in state.callbacks:
        kind = type(callback)
        if kind.__name__ == 'HuggingFaceCheckpointer' and kind.__module__.startswith('llmfoundry.'):
            raise ValueError(
                "LoRAInject: llm-foundry's hf_checkpointer exports the model's own state dict, which holds the "
                'adapters apart from the base, so a plain Hugging Face model cannot load it; use callbacks: '
                f'{{{MERGED_EXPORT}: {{...}}}} (the same options; composer-thaw registers it), which exports the base '
                'with the adapters merged in.'
            )


def _modules_to_save_advice(config: LoRAConfig) -> Any:
    """LoRA's advice to an algorithm that also decides what trains: say it in LoRAInject alone, turning the other's
    plain trainable names into ``modules_to_save`` (``'model.norm.weight'`` -> ``'model.norm'``)."""

    def advice(partner: Claim) -> str:
        if partner.access != 'sets':
            return ''
        plain = [p for p in partner.trains if re.fullmatch(r'[\w.]+', p)]
        named = [re.sub(r'\.(weight|bias)$', '', p) for p in plain]
        saved = list(dict.fromkeys([*config.saved_entries(), *named])) or ['lm_head']
        return (
            'To train modules in full next to the adapters, name them in LoRAInject and drop the other: '
            f'LoRAInject(..., modules_to_save={saved!r}) trains those whole modules (e.g. a head) next to the '
            "adapters, with the rest of the base frozen; bias='all' or 'lora_only' trains biases."
        )

    return advice


class LoRAInject(ThawAlgorithm):
    """Low-rank adapters (LoRA, DoRA, rsLoRA, PiSSA) injected at ``Event.INIT``.

    Give the adapters' configuration as a :class:`~composer_thaw.lora_inject.config.LoRAConfig`, as PEFT takes its
    ``LoraConfig`` (``LoRAInject(LoRAConfig(r=16, target_modules=['q_proj']))``), or its fields as options of their
    own (``LoRAInject(r=16, target_modules=['q_proj'])``, a recipe's ``lora_inject: {r: 16, ...}``), not both: the
    same algorithm either way, with the same ``repr`` (the fields that differ from their defaults). The fields read
    through as attributes (``algorithm.r`` is ``algorithm.config.r``). The options of the algorithm alone:

    Args:
        config: the adapters' :class:`~composer_thaw.lora_inject.config.LoRAConfig` (copied); ``None``: built from
            the fields given as options.
        save_adapter_to: at ``Event.FIT_END``, write the adapter in PEFT's format (``adapter_config.json`` +
            ``adapter_model.safetensors``) to this directory.
        save_merged_to: at ``Event.FIT_END``, write the merged model as a plain Hugging Face checkpoint
            (``save_pretrained`` layout) to this directory.
        checkpoint_trainable_only: Composer checkpoints hold the adapters (and ``modules_to_save``, trained biases),
            their optimizer state and the algorithm state, plus a fingerprint of the frozen base weights, which a
            resume takes from the model as built and checks (:mod:`~composer_thaw.utils.trainable_checkpoints`), as
            Composer's ``should_save_peft_only`` does for PEFT models. ``None`` (default): on, except under FSDP2
            (full checkpoints there); ``False``: full checkpoints.
        master_weights: ``'fp32'``: the base stays in the model's low-precision dtype; adapters are fp32 parameters
            anyway on a bf16/fp16 base (PEFT's ``autocast_adapter_dtype``), and the other tensors that train
            (``modules_to_save``, biases) keep low-precision weights with fp32 master copies and fp32 optimizer state
            (:mod:`composer_thaw.utils.master_weights`). Default: ``None``.

    Under FSDP2, an adapter on a bf16/fp16 base takes its base's dtype (FSDP2 all-gathers a sharded module's
    parameters in one dtype; :func:`~composer_thaw.lora_inject.surgery.adapters_in_base_dtype`): with
    ``master_weights='fp32'`` it trains through an fp32 master and fp32 optimizer state, as the other tensors do.

    The Hugging Face model's own ``state_dict()`` holds the adapters, as Composer's checkpoints do. A plain Hugging
    Face export merges them in explicitly: ``save_merged_to``,
    :func:`~composer_thaw.lora_inject.peft_format.export_merged`,
    ``with merged_state_dict_view(model): model.save_pretrained(...)``, or under llm-foundry the
    ``merged_hf_checkpointer`` callback (:mod:`composer_thaw.lora_inject.llmfoundry_export`; the plain
    ``hf_checkpointer`` is refused before training).

    Resume a checkpoint written with ``LoRAInject`` by passing the same ``LoRAInject`` to the new Trainer: Composer
    re-applies only its own surgery algorithms automatically. A checkpoint written without LoRA (a plain run) loads
    with ``load_weights_only=True``: its weights become the base weights and the adapters start at their
    initialisation (see :class:`~composer_thaw.lora_inject.layers.LoRALayer`).

    ``RegexFreeze`` in the same Trainer is refused (at ``Event.INIT``, before anything changes): it would override
    what LoRA trains (:mod:`composer_thaw.core.compatibility`, from :meth:`owns`). Train extra modules in full with
    ``modules_to_save``, biases with ``bias``.
    """

    # INIT: inject (frozen parameters get requires_grad=False); BEFORE_LOAD, after all INIT-time surgery: take the
    # frozen parameters out of the optimizer; FIT_END: only with save_adapter_to / save_merged_to.
    events: tuple[Event, ...] = (Event.INIT, Event.BEFORE_LOAD, Event.FIT_END)
    # What shapes the adapters and what they compute; a checkpoint's adapters resume only under the same values.
    # Every field but the dropout (task_type adds the task's head to modules_to_save), and master_weights: fp32
    # masters and their optimizer state in the checkpoint.
    resume_fields = (*(name for name in OPTIONS.names if name != 'lora_dropout'), 'master_weights')
    master_copies: MasterWeightsOption
    duplicate_advice = 'give one LoRAInject (rank_pattern and alpha_pattern set per-target ranks).'

    @OPTIONS.accept_fields
    def __init__(
        self,
        config: Optional[LoRAConfig] = None,
        *,
        save_adapter_to: Optional[str] = None,
        save_merged_to: Optional[str] = None,
        checkpoint_trainable_only: Optional[bool] = None,
        master_weights: Optional[Literal['fp32']] = None,
        **options: Any,
    ) -> None:
        for key, value in (('save_adapter_to', save_adapter_to), ('save_merged_to', save_merged_to)):
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f'{key}={value!r} is invalid: give a directory path (string) or None.')
        self.config: LoRAConfig = OPTIONS.build(config, options)
        self.save_adapter_to, self.save_merged_to = save_adapter_to, save_merged_to
        self.checkpoint_trainable_only = checkpoint_trainable_only
        self.master_weights = master_weights
        self.master_copies = MasterWeightsOption(master_weights)

    @staticmethod
    def required_on_load() -> bool:
        return True

    def owns(self) -> tuple[Claim, ...]:
        """LoRA decides that the base stays frozen (outside ``modules_to_save`` and ``bias``) and creates the
        adapters (see :mod:`composer_thaw.core.compatibility`)."""
        advice = _modules_to_save_advice(self.config)
        return (Claim(BASE_PARAMETERS, 'sets', advice), Claim(ADAPTERS, 'provides', advice))

    def match(self, event: Event, state: State) -> bool:
        return event in self.events and (event != Event.FIT_END or bool(self.save_adapter_to or self.save_merged_to))

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self.check_trainer(state)
            _refuse_plain_hf_checkpointer(state)
            # The same adapter initialization on every rank, as Composer does before sharding: FSDP2 keeps each rank's
            # own rows, so per-rank seeds would give a model that no single process could have built.
            with reproducibility.seed_context(state.rank_zero_seed):
                summary = inject_adapters(state.model, state.optimizers, self.config)
            if isinstance(getattr(state, 'fsdp_config', None), FSDP2Config):
                adapters_in_base_dtype(state.model)  # FSDP2 shards a module's parameters in one dtype
            root = user_module(state.model)
            frozen = self.checkpoint_trainable_only
            install_for_trainer(state, self, frozen, default=True, frozen=lambda: frozen_base_parameters(root))
            logger.log_metrics(
                {
                    'lora_inject/adapted_modules': len(summary.adapted),
                    'lora_inject/trainable_params': summary.trainable_params,
                    'lora_inject/trainable_fraction': summary.trainable_fraction,
                }
            )
            return
        if event == Event.BEFORE_LOAD:
            _check_base_layers_kept(user_module(state.model), self.config, bool(self.save_merged_to))
            freeze_outside_adapters(state.model, state.optimizers)
            self.master_copies.enable(state.model, state.optimizers)
            refuse_adapters_of_another_rank(state.model, self)  # checked as Composer loads the checkpoint's weights
            return
        # On every rank: under FSDP2 the whole tensors are gathered from all of them; rank 0 writes.
        if self.save_adapter_to:
            save_adapter(state.model, self.save_adapter_to, masters=self.master_copies.masters)
        if self.save_merged_to:
            export_merged(state.model, self.save_merged_to)
        dist.barrier()

    def own_state(self) -> dict[str, Any]:
        return {'config': self.config.to_dict()}


def estimate_memory(
    model: nn.Module, optimizer: Optimizer, algorithm: LoRAInject, settings: EstimateSettings
) -> MemoryPlan:
    """For ``thaw estimate``: the adapters and what else trains (``modules_to_save``, biases); sharded over several
    processes the adapters take their base's dtype, as LoRAInject makes them under FSDP2."""
    apply_lora(model, optimizer, algorithm.config)
    if settings.world_size > 1:
        adapters_in_base_dtype(model)
    return resident_plan(optimizer, settings)
