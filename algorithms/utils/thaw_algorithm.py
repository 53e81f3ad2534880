"""The steps every algorithm of this package takes the same way, written once: a subclass shows only its own.

:class:`ThawAlgorithm` is a Composer ``Algorithm`` whose constructor arguments are checked and whose ``repr`` is its
constructor call (:class:`~composer_thaw.core.state.ConfigRepr`). Around that it does:

* at ``Event.INIT``, :meth:`~ThawAlgorithm.check_trainer`: the other algorithms of the Trainer
  (:mod:`composer_thaw.core.compatibility`, from what each one :meth:`owns`) and the refusal of FSDP1;
* its checkpoint state: the ``repr``, the state's version (:attr:`~ThawAlgorithm.state_version`), the options a
  checkpoint resumes only with (``resume_fields``), the fp32 masters (:attr:`~ThawAlgorithm.master_copies`) and what
  the subclass adds (:meth:`~ThawAlgorithm.own_state`);
* loading it: the version and the resume options checked first, then the subclass's part
  (:meth:`~ThawAlgorithm.load_own_state`), then the masters.

Example:
    >>> from composer.core import Event
    >>> class FreezeHead(ThawAlgorithm):
    ...     duplicate_advice = 'give one FreezeHead.'
    ...     resume_fields = ('head',)
    ...     def __init__(self, head: str = 'lm_head', master_weights=None):
    ...         self.head, self.master_weights = head, master_weights
    ...         self.master_copies = MasterWeightsOption(master_weights)
    ...     def match(self, event, state):
    ...         return event == Event.INIT
    ...     def apply(self, event, state, logger):
    ...         self.check_trainer(state)
    ...         state.model.model.get_submodule(self.head).requires_grad_(False)
    >>> FreezeHead().state_dict()
    {'repr': 'FreezeHead()', 'thaw_state_version': 1, ...}
    >>> FreezeHead(head='score').load_state_dict(FreezeHead().state_dict())
    Traceback (most recent call last):
    ResumeConfigError: FreezeHead.head = 'score': the checkpoint was trained with head = 'lm_head'; ...
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

from composer.core import Algorithm, State
from composer.utils.parallelism import FSDP2Config

from composer_thaw.core.compatibility import check_compatibility
from composer_thaw.core.resume_checks import check_resume_config, resume_state
from composer_thaw.core.state import STATE_VERSION_KEY, ConfigRepr, check_state_version
from composer_thaw.utils.master_weights import MasterWeightsOption
from composer_thaw.utils.sharding import average_gradients_on_gloo, refuse_fsdp1

__all__ = ['ThawAlgorithm']


class ThawAlgorithm(ConfigRepr, Algorithm):
    """Base of the package's algorithms: INIT checks, versioned checkpoint state, resume checks and masters, once.

    A subclass sets :attr:`duplicate_advice` (what to do instead of listing it twice), ``resume_fields`` (options a
    checkpoint resumes only with, :mod:`composer_thaw.core.resume_checks`) and, when its checkpoint state changes
    shape, :attr:`state_version`; it keeps its ``master_weights`` option in :attr:`master_copies`; it calls
    :meth:`check_trainer` first at ``Event.INIT`` and extends :meth:`own_state` and :meth:`load_own_state` (not
    ``state_dict`` and ``load_state_dict``).
    """

    state_version: ClassVar[int] = 1
    duplicate_advice: ClassVar[str] = ''
    resume_fields: tuple[str, ...] = ()  # options a checkpoint resumes only with
    master_copies: Optional[MasterWeightsOption] = None  # the fp32 masters this algorithm saves and loads

    def check_trainer(self, state: State) -> None:
        """At ``Event.INIT``, before any change: refuse a second instance or a conflicting algorithm, and FSDP1."""
        check_compatibility(self, state.algorithms, self.duplicate_advice)
        refuse_fsdp1(state, type(self).__name__)
        if isinstance(getattr(state, 'fsdp_config', None), FSDP2Config):
            average_gradients_on_gloo()  # FSDP2 on CPU sums gradients across processes without it

    def own_state(self) -> dict[str, Any]:
        """What this algorithm adds to its checkpoint state."""
        return {}

    def load_own_state(self, state: dict[str, Any]) -> None:
        """Take back what :meth:`own_state` saved (the version and the resume options are checked already)."""

    def state_dict(self) -> dict[str, Any]:
        masters = self.master_copies.state_dict() if self.master_copies is not None else {}
        return {
            'repr': repr(self),
            STATE_VERSION_KEY: self.state_version,
            **resume_state(self),
            **self.own_state(),
            **masters,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_version(type(self).__name__, state, self.state_version)
        check_resume_config(self, state)
        self.load_own_state(state)
        if self.master_copies is not None:
            self.master_copies.load_state_dict(state)
