"""The conformance suite's cases and its one way of running an algorithm under Composer's Trainer.

Cases come from the registry: every implemented algorithm of ours and every third-party algorithm registered
under the ``composer_thaw.algorithms`` entry point, each example config it declares in its module's
``EXAMPLES``. A new algorithm is covered as soon as it is registered with examples.

The tiny task: the built-in LLaMA-style decoder (hidden 32, 4 blocks) on 16 blocks of 32 tokens of the Python
topics corpus; 4 batches of 4 sequences per epoch (the global batch is split across processes).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from composer import Trainer
from composer.core import Algorithm, Callback, State
from composer.loggers import Logger
from composer.utils import dist, reproducibility

from composer_thaw.core.registry import algorithm_module, algorithm_registry, build_algorithm
from composer_thaw.datasets.builtin import LanguageModelingDataset, build_dataloader, python_topics_corpus
from composer_thaw.models.builtin import load_tokenizer, tiny_decoder
from composer_thaw.utils.master_weights import LOW_PRECISION_DTYPES, master_weights_of
from composer_thaw.utils.optimizer_surgery import group_index_of
from composer_thaw.utils.parameter_selection import user_module
from composer_thaw.utils.sharding import is_sharded, local_tensor

GLOBAL_BATCH = 4
TRAIN_BLOCKS = 16
SEQ_LEN = 32
MODEL_SEED = 0
TRAIN_SEED = 17
# The sharded case trains 8 steps at this learning rate: FSDP2 reduce-scatters gradients in another order than one
# process sums them, and Adam's normalisation amplifies those last-bit differences where gradients are tiny.
SHARDED_LR = 1e-3


@dataclass(frozen=True)
class Case:
    """One algorithm with one of its example configurations."""

    name: str
    index: int
    kwargs: dict[str, Any]

    @property
    def id(self) -> str:
        return f'{self.name}[{self.index}]'

    def build(self) -> Algorithm:
        return build_algorithm(self.name, self.kwargs)

    @property
    def cls(self) -> type[Algorithm]:
        return algorithm_registry()[self.name].load()


def covered_names() -> list[str]:
    """Every registered algorithm that is not Composer's own: ours and third parties' (entry points)."""
    return sorted(name for name, entry in algorithm_registry().items() if entry.source != 'composer')


def examples_of(name: str) -> tuple[dict[str, Any], ...]:
    examples = getattr(algorithm_module(name), 'EXAMPLES', ())
    if not examples:
        raise AssertionError(f'{name} declares no EXAMPLES next to its class: the conformance suite cannot cover it.')
    return tuple(examples)


def all_cases() -> list[Case]:
    return [Case(name, i, dict(kwargs)) for name in covered_names() for i, kwargs in enumerate(examples_of(name))]


def first_cases() -> list[Case]:
    """One case per algorithm (for the expensive checks)."""
    return [case for case in all_cases() if case.index == 0]


def last_cases() -> list[Case]:
    """Each algorithm's last example: the one that changes most during a short run, for checkpoints taken mid-way."""
    return [case for case in all_cases() if case.index == len(examples_of(case.name)) - 1]


def first_and_last_cases() -> list[Case]:
    """Each algorithm's first and last example (for the checks too expensive to run on every example)."""
    ends = {case.id for case in first_cases() + last_cases()}
    return [case for case in all_cases() if case.id in ends]


def ids(cases: Sequence[Case]) -> list[str]:
    return [case.id for case in cases]


def lm_loader(split: int = 0, blocks: int = TRAIN_BLOCKS):
    tokenizer = load_tokenizer()
    dataset = LanguageModelingDataset(python_topics_corpus()[split], tokenizer, SEQ_LEN, blocks)
    return build_dataloader(
        dataset, tokenizer, GLOBAL_BATCH // dist.get_world_size(), shuffle=split == 0, drop_last=split == 0
    )


def tiny_model():
    reproducibility.seed_all(MODEL_SEED)
    return tiny_decoder('llama', num_layers=4, hidden_size=32, num_heads=4)


def adamw(model: torch.nn.Module, lr: float = 3e-3) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return torch.optim.AdamW([{'params': decay}, {'params': no_decay, 'weight_decay': 0.0}], lr=lr, weight_decay=0.1)


def make_trainer(
    algorithms: Sequence[Algorithm],
    max_duration: str = '3ep',
    model=None,
    **kwargs: Any,
) -> Trainer:
    model = model if model is not None else tiny_model()
    optimizers = kwargs.pop('optimizers', None) or adamw(model)
    options = dict(
        train_dataloader=lm_loader(),
        eval_dataloader=lm_loader(split=1, blocks=4),
        eval_interval='1ep',
        max_duration=max_duration,
        device='cpu',
        progress_bar=False,
        log_to_console=False,
        seed=TRAIN_SEED,
        save_overwrite=True,
    )
    options.update(kwargs)
    return Trainer(model=model, optimizers=optimizers, algorithms=list(algorithms), **options)


def sgd_trainer(**kwargs: Any) -> Trainer:
    """8 plain SGD steps on the tiny task, no algorithm: SGD shows a gradient's scale, which AdamW hides (the sharded
    part compares its gradient averaging with one process's)."""
    model = tiny_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    return make_trainer([], max_duration='8ba', model=model, optimizers=optimizer, eval_dataloader=None, **kwargs)


def parameters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in user_module(trainer.state.model).named_parameters()}


def optimizer_state(trainer: Trainer) -> dict[str, dict[str, torch.Tensor]]:
    """The optimizer's state keyed by parameter name (so two trainers' states can be compared)."""
    names = {id(p): name for name, p in user_module(trainer.state.model).named_parameters()}
    optimizer = trainer.state.optimizers[0]
    return {
        names[id(p)]: {k: v.detach().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
        for p, state in optimizer.state.items()
    }


@dataclass
class RunResult:
    params: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, torch.Tensor]]
    batches_run: int = 0
    events: set = field(default_factory=set)  # events at which our algorithm's apply ran
    loss_before: float = 0.0
    loss_after: float = 0.0
    algorithm_state: dict[str, Any] = field(default_factory=dict)
    eval_loss: float = 0.0


def fixed_batch_loss(model) -> float:
    batch = next(iter(lm_loader(split=1, blocks=4)))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = float(model.loss(model(batch), batch))
    model.train(was_training)
    return loss


def run(
    case: Case, max_duration: str = '3ep', extra: Sequence[Algorithm] = (), first: bool = True, **kwargs: Any
) -> RunResult:
    """Train ``case`` (plus ``extra`` algorithms, ours first unless ``first=False``) and return the end state."""
    algorithm = case.build()
    events: set = set()
    original_apply = algorithm.apply

    def recording_apply(event, state, logger):
        events.add(event)
        return original_apply(event, state, logger)

    algorithm.apply = recording_apply  # instance attribute: the class and other instances are untouched
    algorithms = [algorithm, *extra] if first else [*extra, algorithm]
    trainer = make_trainer(algorithms, max_duration=max_duration, **kwargs)
    start = int(trainer.state.timestamp.batch)
    loss_before = fixed_batch_loss(trainer.state.model)
    trainer.fit()
    result = RunResult(
        parameters(trainer),
        optimizer_state(trainer),
        int(trainer.state.timestamp.batch) - start,
        events,
        loss_before,
        fixed_batch_loss(trainer.state.model),
        algorithm.state_dict(),
        float(trainer.state.eval_metrics['eval']['LanguageCrossEntropy'].compute())
        if trainer.state.eval_metrics
        else 0.0,
    )
    trainer.close()
    return result


_BASELINES: dict[str, RunResult] = {}


def baseline(case: Case) -> RunResult:
    """The uninterrupted default run of ``case``, computed once per session and shared by the checks."""
    if case.id not in _BASELINES:
        _BASELINES[case.id] = run(case)
    return _BASELINES[case.id]


def assert_same_state(actual: RunResult, expected: RunResult, atol: Optional[float] = None) -> None:
    """Bit-identical parameters and optimizer state (or within ``atol``)."""
    assert actual.params.keys() == expected.params.keys()
    for name, value in expected.params.items():
        if atol is None:
            assert torch.equal(actual.params[name], value), f'parameter {name} differs'
        else:
            torch.testing.assert_close(actual.params[name], value, atol=atol, rtol=0, msg=f'parameter {name} differs')
    assert actual.optimizer_state.keys() == expected.optimizer_state.keys(), 'optimizer state covers other parameters'
    for name, state in expected.optimizer_state.items():
        for key, value in state.items():
            if atol is None:
                assert torch.equal(actual.optimizer_state[name][key], value), f'optimizer state {name}.{key} differs'
            else:
                torch.testing.assert_close(actual.optimizer_state[name][key], value, atol=atol, rtol=1e-4)


# ---- sharded runs against one process ----
# With gradients averaged on gloo (utils.sharding.average_gradients_on_gloo) FSDP2 and HSDP differ from one process
# only in the order a gradient's parts are summed. After the sharded cases' 8 AdamW steps at SHARDED_LR, measured:
# at most 1.4e-5 apart per element (HiFT under HSDP; 6e-6 for the others), 4e-10 on average, for straight runs at 2
# and 4 processes and for resumes across world sizes alike. (While gloo summed instead, runs ended up to 2e-3 apart.)
SHARDED_MAX_DIFF = 1e-4
SHARDED_MEAN_DIFF = 1e-8


def one_process_run(case: Case) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """The sharded cases' training (2 epochs, AdamW at ``SHARDED_LR``) in one unsharded process: the parameters and
    the optimizer state at the end; computed once per process."""
    if case.id not in _ONE_PROCESS:
        model = tiny_model()
        trainer = make_trainer(
            [case.build()], max_duration='2ep', model=model, optimizers=adamw(model, SHARDED_LR), eval_dataloader=None
        )
        trainer.fit()
        _ONE_PROCESS[case.id] = parameters(trainer), optimizer_state(trainer)
        trainer.close()
    return _ONE_PROCESS[case.id]


_ONE_PROCESS: dict[str, tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]] = {}


def assert_like_one_process(whole: dict[str, torch.Tensor], case: Case, what: str = 'sharded run') -> None:
    """``whole`` (a sharded run's parameters, gathered) ends where one process ends (within the sharded tolerance),
    and every element that one process left at its initial value (frozen tensors and rows) is bit-identical."""
    single, _ = one_process_run(case)
    assert whole.keys() == single.keys(), f'{what} has other parameters than one process'
    differences = torch.cat([(whole[name] - value).abs().flatten() for name, value in single.items()])
    assert differences.max() <= SHARDED_MAX_DIFF and differences.mean() <= SHARDED_MEAN_DIFF, (
        f'{what} differs from one process by up to {differences.max():.2e}, {differences.mean():.2e} on average'
    )
    initial = dict(user_module(tiny_model()).named_parameters())
    for name, value in single.items():
        before = initial.get(name.replace('.base_layer', ''))
        if before is not None and before.shape == value.shape:
            unchanged = value == before  # frozen tensors and rows in the unsharded run
            assert torch.equal(whole[name][unchanged], before[unchanged]), f'{what}: frozen elements of {name} moved'


def assert_optimizer_state_sharded(record: dict[str, Any], case: Case) -> None:
    """A sharded run's optimizer record (tests/conformance/fsdp2_script.py) holds state for the parameters one
    process's optimizer does, sharded like them: each of the mesh's replicas holds all of it, split over its shards."""
    _, single_state = one_process_run(case)
    assert record['names'] == sorted(single_state), 'optimizer state covers other parameters than one process'
    assert record['sharded_state'], 'optimizer state is not sharded like the parameters'
    *replicas, shards = record['mesh_shape']
    copies = replicas[0] if replicas else 1
    tensors = [v for state in single_state.values() for v in state.values() if v.ndim]
    single_bytes = sum(v.numel() * v.element_size() for v in tensors)
    # FSDP2 gives each shard torch.chunk's rows of dim 0: the first ones ceil(rows / shards) each
    largest_share = sum(-(-v.shape[0] // shards) * (v.numel() // v.shape[0]) * v.element_size() for v in tensors)
    local = record['local_bytes']
    assert len(local) == shards * copies
    assert sum(local) == single_bytes * copies, 'a copy of the model holds other optimizer state than one process'
    assert max(local) <= largest_share, 'a rank holds more than its share of the optimizer state'


# ---- the low-precision mode (master_weights='fp32') ----
def master_weights_cases() -> list[Case]:
    """Each algorithm's last example with ``master_weights='fp32'``, for those that take the option."""
    return [
        Case(case.name, case.index, {**case.kwargs, 'master_weights': 'fp32'})
        for case in last_cases()
        if 'master_weights' in inspect.signature(case.cls).parameters
    ]


def bf16_model():
    return tiny_model().to(torch.bfloat16)


def assert_masters_case_passed(result: dict[str, Any], case: Case, shards: int, replicas: int = 1) -> None:
    """A sharded master-weights case (``fsdp2_script.masters_case``) passed: ``MasterCheck`` and the fp32 reference at
    each of 8 steps, bf16 weights, masters sharded like their weights over ``shards`` processes (and held whole by
    each of ``replicas``), and a bit-identical resume from its checkpoint at step 2."""
    assert result['steps'] == [8, 6]
    assert result['failures'] == []
    assert result['reference_steps'] == 8 and result['reference_failures'] == []
    assert result['weights_bf16'], 'a weight left bf16 (a LoRA adapter keeps its base dtype under FSDP2)'
    assert result['masters_sharded'], 'a master is not sharded like its weight'
    local, whole = result['local_master_bytes'], result['whole_master_bytes']
    assert len(local) == shards * replicas and sum(local) == whole * replicas > 0
    assert max(local) <= whole // shards + 4096, 'a rank holds more than its share of masters'
    assert result['resume_exact'], 'resuming from the sharded checkpoint changed the bf16 weights'
    assert result['masters_resume_exact'], 'resuming from the sharded checkpoint changed the fp32 masters'
    if case.name == 'lora_inject':  # its PEFT export gathers the sharded masters: fp32 adapters, as PEFT writes
        assert result['adapters_exported_from_masters']


class MasterCheck(Callback):
    """After every optimizer step: fp32 masters for exactly the low-precision tensors that train, each (and each
    parked master of a tensor that may train again) equal to its weight, cast; fp32 optimizer state; no fp32 parameter
    that is frozen. Sharded (FSDP2) masters are compared part by part on each rank. What fails is recorded in
    ``failures`` (a rank that raised would leave the other waiting in a collective)."""

    def __init__(self) -> None:
        self.steps = 0
        self.failures: list[str] = []
        self.sharded: list[bool] = []  # whether every master is a DTensor, at each step

    def _check(self, condition: bool, failure: str) -> None:
        if not condition and failure not in self.failures:
            self.failures.append(failure)

    def batch_end(self, state: State, logger: Logger) -> None:
        optimizer = state.optimizers[0]
        masters = master_weights_of(optimizer)
        self.steps += 1
        if masters is None:
            self._check(False, 'master_weights=fp32 attached nothing to the optimizer')
            return
        in_optimizer = {id(p) for group in optimizer.param_groups for p in group['params']}
        trains = {
            id(p)
            for group in optimizer.param_groups
            for p in group['params']
            if p.requires_grad and p.dtype in LOW_PRECISION_DTYPES
        }
        self._check(set(masters.masters) == trains, 'fp32 masters exist for other tensors than those that train')
        parked = [(entry.param, entry.restore()) for entry in masters.parked.values()]
        for param, master in [*masters.masters.values(), *parked]:
            self._check(master.dtype == torch.float32 and param.dtype == torch.bfloat16, 'a master is not fp32')
            same = torch.equal(local_tensor(master).to(torch.bfloat16), local_tensor(param.detach()))
            self._check(same, 'a bf16 weight is not its master, cast')
            for key, value in optimizer.state.get(param, {}).items():
                self._check(key == 'step' or value.dtype == torch.float32, f'optimizer state {key} is {value.dtype}')
        self._check(not set(masters.parked) - in_optimizer, 'a master is kept for a tensor out of the optimizer')
        for param in user_module(state.model).parameters():
            if param.dtype == torch.float32:  # only adapters a bf16 base gets (PEFT's autocast_adapter_dtype)
                self._check(param.requires_grad and id(param) in in_optimizer, 'an fp32 copy of a frozen tensor')
        held = [p for p, _ in masters.masters.values()] + [e.param for e in masters.parked.values() if not e.offloaded]
        expected = 4 * sum(local_tensor(p).numel() for p in held)
        self._check(masters.master_bytes() == expected, 'master_bytes() is not 4 bytes per element held')
        self.sharded.append(all(is_sharded(master) for _, master in masters.masters.values()))


class MasterReference(Callback):
    """The promise of ``master_weights='fp32'``, replayed on an independent reference at every optimizer step: an fp32
    copy of every tensor that has trained so far, kept for the whole run, stepped by an optimizer of the run's class
    and hyperparameters (each param group's, as the step used them) on the gradients the run's step received, and
    cast back into a copy of its weight. After each step every weight must equal its reference copy, cast, bit for
    bit: an algorithm that drops a master and makes it again from the rounded weight (losing the updates below the
    weight's resolution that it held) fails. Under FSDP2 each rank replays its own shards (the step is elementwise).
    Failures are recorded in ``failures``, as :class:`MasterCheck` does."""

    def __init__(self) -> None:
        self.steps = 0
        self.failures: list[str] = []
        self.masters: dict[str, torch.Tensor] = {}  # parameter name -> this rank's part of the reference copy
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self._step: dict[str, tuple[int, torch.Tensor, torch.Tensor]] = {}  # name -> (group, gradient, weight)
        self._hyperparameters: list[dict[str, Any]] = []

    def after_backward(self, state: State, logger: Logger) -> None:
        """After the last microbatch's backward the gradients are the step's (reduced across ranks)."""
        optimizer = state.optimizers[0]
        groups = group_index_of(optimizer)
        self._step = {
            name: (groups[id(p)], local_tensor(p.grad).detach().clone(), local_tensor(p.detach()).clone())
            for name, p in user_module(state.model).named_parameters()
            if p.grad is not None and id(p) in groups
        }
        self._hyperparameters = [{k: v for k, v in g.items() if k != 'params'} for g in optimizer.param_groups]

    @torch.no_grad()
    def batch_end(self, state: State, logger: Logger) -> None:
        self.steps += 1
        optimizer = state.optimizers[0]
        if self.optimizer is None:
            accepted = inspect.signature(type(optimizer)).parameters  # defaults may hold more than it takes
            defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
            self.optimizer = type(optimizer)([{'params': []} for _ in optimizer.param_groups], **defaults)
        for reference, hyperparameters in zip(self.optimizer.param_groups, self._hyperparameters):
            reference.update(hyperparameters)
        for master in self.masters.values():
            master.grad = None
        for name, (group, grad, weight) in self._step.items():
            if name not in self.masters:  # first trained now: its copy starts from the weight, as a master would
                self.masters[name] = weight.to(torch.float32)
                self.optimizer.param_groups[group]['params'].append(self.masters[name])
            self.masters[name].grad = grad.to(torch.float32)
        self._step = {}
        self.optimizer.step()
        params = dict(user_module(state.model).named_parameters())
        differ = [
            name
            for name, master in self.masters.items()
            if not torch.equal(local_tensor(params[name].detach()), master.to(params[name].dtype))
        ]
        if differ:
            self.failures.append(f'step {self.steps}: weights differ from the fp32 reference: {differ[:4]}')
