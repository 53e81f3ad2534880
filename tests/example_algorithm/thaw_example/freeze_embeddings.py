"""FreezeEmbeddings: keep the token embeddings (and optionally the output embeddings) fixed during fine-tuning.

On small language models the vocabulary matrices are the largest tensors: in the conformance suite's decoder
(hidden 32, 4 blocks, 1,994,656 parameters) the input and the output embeddings hold 976,704 each. Frozen
embeddings stop requiring grad and leave the optimizer with their state, so they cost neither gradients nor
optimizer state, and they stay bit-identical.

Built from composer-thaw's shared pieces: :func:`composer_thaw.utils.parameter_selection.user_module` (names relative to
the user's model), :func:`composer_thaw.utils.optimizer_surgery.remove_params` (the parameters and their optimizer state
leave the optimizer), :class:`composer_thaw.core.state.ConfigRepr` (``repr`` and ``==``),
:func:`composer_thaw.core.state.check_state_version` and :func:`composer_thaw.utils.sharding.refuse_fsdp1`.

Example:
    >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    >>> apply_freeze_embeddings(model, optimizer, which='both')
    ['model.embed_tokens.weight', 'lm_head.weight']
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional, Union, get_args

from composer.core import Event, State
from composer.loggers import Logger
from torch import nn
from torch.optim import Optimizer

from composer_thaw.core.compatibility import BASE_PARAMETERS, Claim
from composer_thaw.core.types import single_optimizer
from composer_thaw.utils.optimizer_surgery import remove_params
from composer_thaw.utils.parameter_selection import user_module
from composer_thaw.utils.thaw_algorithm import ThawAlgorithm

__all__ = ['FreezeEmbeddings', 'apply_freeze_embeddings', 'embedding_parameters']

Which = Literal['input', 'output', 'both']
WHICH: tuple[str, ...] = get_args(Which)

# Valid on the conformance suite's model, tiny_decoder('llama', num_layers=4, hidden_size=32): the suite runs each.
EXAMPLES: tuple[dict[str, Any], ...] = (
    {},
    {'which': 'both'},
)

Optimizers = Union[Optimizer, Sequence[Optimizer]]


def _check_which(which: Any) -> None:
    if not isinstance(which, str) or which not in WHICH:
        raise ValueError(f'which={which!r} is not a choice; choose one of {list(WHICH)}.')


def _hf_embeddings(root: nn.Module, getter: str) -> Optional[nn.Module]:
    """``root.get_input_embeddings()`` / ``get_output_embeddings()`` of a Hugging Face model, else ``None``."""
    method = getattr(root, getter, None)
    if not callable(method):
        return None
    try:
        return method()
    except NotImplementedError:  # a PreTrainedModel subclass that does not say where its embeddings are
        return None


def embedding_parameters(model: nn.Module, which: Which = 'input') -> dict[str, nn.Parameter]:
    """The parameters ``which`` names, by their name in the user's model; changes nothing.

    Input embeddings are those of ``get_input_embeddings()`` on a Hugging Face model, and every
    :class:`torch.nn.Embedding` of any other model. Output embeddings are those of ``get_output_embeddings()``
    (the LM head). A tied input and output matrix is one parameter and is returned once.

    Args:
        model: a Hugging Face model or any ``nn.Module``, bare or wrapped by Composer and/or DDP.
        which: ``'input'``, ``'output'`` or ``'both'``.

    Raises:
        ValueError: ``which`` is not a choice, or the model has no such embedding parameters.
    """
    _check_which(which)
    root = user_module(model)
    modules: list[nn.Module] = []
    if which in ('input', 'both'):
        found = _hf_embeddings(root, 'get_input_embeddings')
        modules += [found] if found is not None else [m for m in root.modules() if isinstance(m, nn.Embedding)]
    if which in ('output', 'both'):
        found = _hf_embeddings(root, 'get_output_embeddings')
        modules += [found] if found is not None else []
    wanted = {id(p) for module in modules for p in module.parameters()}
    selected = {name: p for name, p in root.named_parameters() if id(p) in wanted}
    if not selected:
        raise ValueError(
            f'FreezeEmbeddings(which={which!r}) found no embedding parameters in {type(root).__name__}: it needs a '
            'Hugging Face model (get_input_embeddings / get_output_embeddings) or, for input embeddings, a model '
            'with torch.nn.Embedding modules.',
        )
    return selected


def apply_freeze_embeddings(model: nn.Module, optimizers: Optional[Optimizers], which: Which = 'input') -> list[str]:
    """Freeze the embeddings ``which`` names: no ``requires_grad``, out of the optimizer with their state.

    Applying again is a no-op. Everything is checked before the model or optimizer changes.

    Args:
        model: a Hugging Face model or any ``nn.Module``, bare or wrapped by Composer and/or DDP.
        optimizers: the optimizer (one) that trains ``model``, or ``None``.
        which: ``'input'`` (default), ``'output'`` or ``'both'``.

    Returns:
        The names of the frozen parameters.

    Raises:
        ValueError: ``which`` is not a choice, or the model has no such embedding parameters.
        NotImplementedError: more than one optimizer.
    """
    optimizer = single_optimizer(optimizers)
    params = embedding_parameters(model, which)
    for param in params.values():
        param.requires_grad_(False)
        param.grad = None
    if optimizer is not None:
        remove_params(optimizer, params.values())
    return list(params)


class FreezeEmbeddings(ThawAlgorithm):
    """Keep the token embeddings (``which='input'``), the output embeddings (``'output'``) or both fixed.

    It only ever freezes (:meth:`owns`): it composes with ``LoRAInject``, ``RegexFreeze`` and ``LayerFreezing``,
    and a rotation (``HiFTRotation``), which would train the embeddings again, is refused.

    At :attr:`.Event.INIT` it only checks the Trainer (listed once, compatible, no FSDP1); it freezes at
    :attr:`.Event.BEFORE_LOAD`, after every INIT-time surgery algorithm changed the model and FSDP2 sharded it,
    and before a checkpoint is loaded or DDP wraps the model. Its checkpoint state names the frozen parameters,
    and resuming with another selection is refused.

    Args:
        which: ``'input'`` (default), ``'output'`` or ``'both'``; see :func:`embedding_parameters`.

    Logs ``freeze_embeddings/frozen_params``, the number of frozen elements.
    """

    events = (Event.INIT, Event.BEFORE_LOAD)
    duplicate_advice = 'give one FreezeEmbeddings, with which=... naming all to freeze.'

    def __init__(self, which: Which = 'input'):
        _check_which(which)
        self.which = which
        self.frozen: Optional[list[str]] = None  # names of the frozen parameters, once applied

    def owns(self) -> tuple[Claim, ...]:
        """What it owns, for :mod:`composer_thaw.core.compatibility`: it narrows which base parameters train."""
        return (Claim(BASE_PARAMETERS, 'narrows', 'FreezeEmbeddings: drop it, or freeze the embeddings otherwise.'),)

    def match(self, event: Event, state: State) -> bool:
        return event in self.events

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.INIT:
            self.check_trainer(state)
            return
        self.frozen = apply_freeze_embeddings(state.model, state.optimizers, self.which)
        params = dict(user_module(state.model).named_parameters())
        logger.log_metrics({'freeze_embeddings/frozen_params': sum(params[name].numel() for name in self.frozen)})

    def own_state(self) -> dict[str, Any]:
        return {'frozen': self.frozen}

    def load_own_state(self, state: dict[str, Any]) -> None:
        saved = state.get('frozen')
        if saved is not None and self.frozen is not None and saved != self.frozen:
            raise ValueError(
                f'FreezeEmbeddings: the checkpoint was trained with {saved} frozen, but which={self.which!r} freezes '
                f'{self.frozen}, so its optimizer state does not fit. Resume with the `which` it was trained with, or '
                'load only its weights (load_weights_only=True).',
            )
