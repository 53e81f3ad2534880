"""Part of the one 2-process launch (tests/two_processes.py): conformance cases sharded with Composer's FSDP2.

For each algorithm's first and last example: a run of 2 epochs (8 AdamW steps at lr 1e-3). For the last example
(by then frozen parameters have left the optimizer, or HiFT's group changed) it saves a checkpoint after each
epoch, in FSDP2's default sharded format and in the full one, and resumes from the first checkpoint in each format;
for the first example, a weights-only load of the unsharded single-process checkpoint given as the second argument.
Then the low-precision mode: each case of ``master_weights_cases()`` trains a bf16 model for 8 steps, checked by
``MasterCheck`` and against ``MasterReference`` (each rank replaying its shards) at every step, saves a sharded
checkpoint at step 2 and resumes from it. Last, the previews of a
sharded model, and LoRAInject's exports from one (``<out>/lora-export``). Writes, from rank 0,
``<out>/results.json`` and ``<out>/<case id>.pt`` (the whole parameters at the end, gathered from the shards).
"""

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests folder, for `conformance.harness`

import torch
from composer.utils import dist
from composer.utils.parallelism import FSDP2Config
from torch.distributed.checkpoint import FileSystemReader

from composer_thaw.hift_rotation.preview import rotation_preview
from composer_thaw.lora_inject import LoRAInject
from composer_thaw.regex_freeze.preview import freeze_preview
from composer_thaw.utils.master_weights import master_weights_of
from composer_thaw.utils.parameter_selection import user_module
from composer_thaw.utils.sharding import full_tensor, is_sharded, local_tensor
from conformance.harness import (
    SHARDED_LR,
    Case,
    MasterCheck,
    MasterReference,
    adamw,
    bf16_model,
    first_and_last_cases,
    last_cases,
    make_trainer,
    master_weights_cases,
    sgd_trainer,
    tiny_model,
)

PREVIEW_PATTERNS = ['model.embed_tokens.weight[0:100]', 'lm_head']

# FSDP2Config, or HSDPConfig with its degrees bound (tests/conformance/hsdp_script.py)
Sharding = Callable[..., FSDP2Config]


def _trainer(
    algorithms,
    state_dict_type: str = 'sharded',
    model=None,
    max_duration: str = '2ep',
    sharding: Sharding = FSDP2Config,
    **kwargs,
):
    """A Trainer of the tiny task sharded by FSDP2 (AdamW at ``SHARDED_LR``, no evaluation)."""
    model = model if model is not None else tiny_model()
    return make_trainer(
        algorithms,
        max_duration=max_duration,
        model=model,
        optimizers=adamw(model, SHARDED_LR),
        eval_dataloader=None,
        parallelism_config={'fsdp': sharding(state_dict_type=state_dict_type)},
        **kwargs,
    )


def _whole_parameters(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: full_tensor(p).detach().clone() for name, p in params.items()}


def _optimizer_record(trainer, params: dict[str, torch.Tensor]) -> dict:
    names = {id(p): name for name, p in params.items()}
    state = trainer.state.optimizers[0].state
    local_bytes = sum(
        local_tensor(v).numel() * v.element_size()
        for s in state.values()
        for v in s.values()
        if isinstance(v, torch.Tensor) and v.ndim > 0
    )
    sharded_state = all(
        is_sharded(v) for s in state.values() for v in s.values() if isinstance(v, torch.Tensor) and v.ndim > 0
    )
    return {
        'names': sorted(names[id(p)] for p in state),
        'local_bytes': dist.all_gather_object(local_bytes),
        'sharded_state': sharded_state,
        'mesh_shape': mesh_shape(params.values()),
    }


def mesh_shape(tensors) -> list[int]:
    """The device mesh the sharded ``tensors`` share: ``[shards]`` for FSDP2, ``[replicas, shards]`` for HSDP."""
    (shape,) = {tuple(p.device_mesh.shape) for p in tensors if is_sharded(p)}
    return list(shape)


def fit(case, state_dict_type: str = 'sharded', **kwargs):
    """2 epochs of ``case`` sharded (``kwargs`` to :func:`_trainer`): the whole parameters at the end, whether all
    were sharded, and the optimizer's record."""
    trainer = _trainer([case.build()], state_dict_type, **kwargs)
    # The sharded parameters, named before training: between steps FSDP2 may leave a module holding its unsharded
    # parameters, while the optimizer (and these names) keep the sharded ones.
    params = dict(user_module(trainer.state.model).named_parameters())
    trainer.fit()
    record = _optimizer_record(trainer, params)
    whole = _whole_parameters(params)
    all_sharded = all(is_sharded(p) for p in params.values())
    trainer.close()
    return whole, all_sharded, record


def _resume_is_exact(case, state_dict_type: str, folder: Path, straight: dict[str, torch.Tensor]) -> bool:
    checkpoint = folder / ('ep1-ba4' if state_dict_type == 'sharded' else 'ep1-ba4-rank0.pt')
    resumed, _, _ = fit(case, state_dict_type, load_path=str(checkpoint))
    return all(torch.equal(resumed[name], value) for name, value in straight.items())


def _weights_only_load(case, plain_checkpoint: str) -> float:
    """Largest difference between the unsharded checkpoint's weights and the sharded model's after loading them."""
    trainer = _trainer([case.build()], 'full', load_path=plain_checkpoint, load_weights_only=True)
    params = dict(user_module(trainer.state.model).named_parameters())
    loaded = {name.replace('.base_layer', ''): value for name, value in _whole_parameters(params).items()}
    trainer.close()
    saved = torch.load(plain_checkpoint, map_location='cpu', weights_only=False)['state']['model']
    saved = {name.removeprefix('model.'): value for name, value in saved.items()}
    return max((loaded[name] - value).abs().max().item() for name, value in saved.items() if name in loaded)


def _parameters_with_state(checkpoint: Path) -> int:
    """How many parameters have optimizer state in a sharded checkpoint."""
    metadata = FileSystemReader(str(checkpoint)).read_metadata()
    return sum(key.startswith('state.optimizers.') and key.endswith('.exp_avg') for key in metadata.state_dict_metadata)


def main(out: Path, plain_checkpoint: str) -> None:
    results = {}
    shared = Path(os.environ.get('THAW_DDP_TMP', out)) / 'sharded-checkpoints'
    checkpointed = {case.id for case in last_cases()}
    for case in first_and_last_cases():
        result: dict = {}
        folders = {state_dict_type: shared / state_dict_type / case.id for state_dict_type in ('sharded', 'full')}
        saving = {'save_folder': str(folders['sharded']), 'save_interval': '1ep'} if case.id in checkpointed else {}
        params, all_sharded, record = fit(case, 'sharded', **saving)  # the straight run
        result.update(all_parameters_sharded=all_sharded, optimizer=record)
        if dist.get_global_rank() == 0:
            torch.save(params, out / f'{case.id}.pt')
        if case.id in checkpointed:
            fit(case, 'full', save_folder=str(folders['full']), save_interval='1ep')
            for state_dict_type, folder in folders.items():
                result[f'resume_exact_{state_dict_type}'] = _resume_is_exact(case, state_dict_type, folder, params)
            result['parameters_with_state_in_checkpoint'] = _parameters_with_state(folders['sharded'] / 'ep1-ba4')
            result['parameters'] = len(params)
        if case.index == 0:
            result['weights_only_load_max_diff'] = _weights_only_load(case, plain_checkpoint)
        results[case.id] = result
    results['master_weights'] = {
        case.id: masters_case(case, shared / 'master-weights' / case.id) for case in master_weights_cases()
    }
    results['previews'] = _previews()
    results['sgd_averaged'] = _sgd_run(out / 'sgd.pt')
    export_lora(out / 'lora-export', parallelism_config={'fsdp': FSDP2Config()})
    if dist.get_global_rank() == 0:
        (out / 'results.json').write_text(json.dumps(results, indent=2))


def _sgd_run(path: Path) -> bool:
    """8 SGD steps, no algorithm, sharded: with the gradients averaged across processes (as our algorithms' INIT has
    made FSDP2 do on gloo by now) they equal one process's to rounding (SGD shows a gradient's scale, AdamW hides it).
    Saves the whole parameters; returns whether the patch was in place before this run."""
    from torch.distributed.fsdp._fully_shard import _fsdp_collectives

    patched = getattr(_fsdp_collectives._get_gradient_divide_factors, 'averages_on_gloo', False)
    trainer = sgd_trainer(parallelism_config={'fsdp': FSDP2Config()})
    params = dict(user_module(trainer.state.model).named_parameters())
    trainer.fit()
    whole = _whole_parameters(params)
    if dist.get_global_rank() == 0:
        torch.save(whole, path)
    trainer.close()
    return patched


def export_lora(out: Path, **trainer_options) -> None:
    """2 epochs of LoRA (with a head trained in full), writing the adapter (PEFT format) and the merged model at the
    end: under FSDP2 every rank takes part in gathering the shards, rank 0 writes."""
    lora = LoRAInject(
        r=4,
        lora_alpha=8,
        target_modules=['q_proj', 'v_proj'],
        modules_to_save=['lm_head'],
        save_adapter_to=str(out / 'adapter'),
        save_merged_to=str(out / 'merged'),
    )
    model = tiny_model()
    trainer = make_trainer(
        [lora],
        max_duration='2ep',
        model=model,
        optimizers=adamw(model, SHARDED_LR),
        eval_dataloader=None,
        **trainer_options,
    )
    trainer.fit()
    trainer.close()


def fit_bf16_with_masters(
    case, callbacks=(), **kwargs
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], int, MasterCheck]:
    """8 steps of ``case`` on a bf16 model under FSDP2 (HiFT visits its groups twice): at the end, the whole
    parameters, the masters gathered whole and this process's bytes of them (parked ones included); and the check."""
    check, algorithm = MasterCheck(), case.build()
    trainer = _trainer([algorithm], model=bf16_model(), max_duration='8ba', callbacks=[check, *callbacks], **kwargs)
    params = dict(user_module(trainer.state.model).named_parameters())
    trainer.fit()
    masters = algorithm.state_dict()['master_weights']  # gathered whole from the shards (every rank calls it)
    held = master_weights_of(trainer.state.optimizers[0])
    local_bytes = held.master_bytes() + held.offloaded_bytes()
    whole = _whole_parameters(params)
    trainer.close()
    return whole, masters, local_bytes, check


def _exported(saved: dict[str, torch.Tensor], name: str, master: torch.Tensor) -> bool:
    """Whether the PEFT file ``saved`` holds the adapter ``name`` (``<layer>.lora_A``/``lora_B``) equal to ``master``
    (PEFT's key: ``<layer>.lora_A.weight``, or ``<layer>.lora_embedding_A`` for an embedding)."""
    layer, _, attr = name.rpartition('.')
    prefix, part = f'base_model.model.{layer}.lora_', f'_{attr[-1]}.'
    return any(
        torch.equal(value, master) for key, value in saved.items() if key.startswith(prefix) and part in key + '.'
    )


def masters_case(case, folder: Path, sharding: Sharding = FSDP2Config) -> dict:
    """``case`` on a bf16 model with fp32 masters, checked at each of 8 steps and against the fp32 reference, saved at
    step 2 into ``folder`` and resumed from there; rank 0 saves the straight run's whole weights and masters to
    ``folder/straight.pt`` (the runs that resume ``folder`` at other world sizes compare with them)."""
    exporting = case.name == 'lora_inject'  # the adapter written at the end, from the sharded fp32 masters
    if exporting:
        case_saving = Case(case.name, case.index, {**case.kwargs, 'save_adapter_to': str(folder / 'adapter')})
    else:
        case_saving = case
    reference = MasterReference()
    straight, masters, local_bytes, check = fit_bf16_with_masters(
        case_saving, callbacks=[reference], save_folder=str(folder), save_interval='2ba', sharding=sharding
    )
    if dist.get_global_rank() == 0:
        torch.save({'weights': straight, 'masters': masters}, folder / 'straight.pt')
    resumed, resumed_masters, _, resumed_check = fit_bf16_with_masters(
        case, load_path=str(folder / 'ep0-ba2'), sharding=sharding
    )
    result = {
        'steps': [check.steps, resumed_check.steps],
        'failures': check.failures + resumed_check.failures,
        'reference_steps': reference.steps,
        'reference_failures': reference.failures,
        'masters_sharded': all(check.sharded + resumed_check.sharded),
        'local_master_bytes': dist.all_gather_object(local_bytes),
        'whole_master_bytes': sum(4 * master.numel() for master in masters.values()),
        'weights_bf16': all(p.dtype == torch.bfloat16 for p in straight.values()),
        'resume_exact': straight.keys() == resumed.keys()
        and all(torch.equal(resumed[name], value) for name, value in straight.items()),
        'masters_resume_exact': masters.keys() == resumed_masters.keys()
        and all(torch.equal(resumed_masters[name], value) for name, value in masters.items()),
    }
    if exporting:
        from safetensors.torch import load_file

        saved = load_file(folder / 'adapter' / 'adapter_model.safetensors')
        adapters = {name: master for name, master in masters.items() if '.lora_' in name}
        result['adapters_exported_from_masters'] = len(adapters) > 0 and all(
            _exported(saved, name, master) for name, master in adapters.items()
        )
    return result


def _previews() -> dict[str, str]:
    """The previews' tables of a sharded model (they read names and whole sizes)."""
    trainer = make_trainer([], parallelism_config={'fsdp': FSDP2Config()}, eval_dataloader=None)
    previews = {
        'freeze': freeze_preview(trainer.state.model, PREVIEW_PATTERNS),
        'rotation': rotation_preview(trainer.state.model, group_size=2),
    }
    trainer.close()
    return previews


if __name__ == '__main__':
    main(Path(sys.argv[1]), sys.argv[2])
