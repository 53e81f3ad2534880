"""Run under ``composer -n 2``: RegexFreeze under DDP keeps ranks identical and frozen rows exact; resume is exact.

One launch checks, on 2 CPU processes (gloo), each rank reading different data, with row ranges, weight decay,
gradient clipping and gradient accumulation:
* after every batch, all parameters are bit-identical on both ranks;
* every frozen element is bit-identical to its initial value, trainable rows have moved;
* optimizer state exists only for trainable tensors;
* a run resumed at world size 2 from a mid-run checkpoint ends bit-identical to the uninterrupted run.
Rank 0 writes the findings as JSON to the path given as the first argument.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import torch
from composer.algorithms import GradientClipping
from composer.utils import dist, reproducibility
from rank_checks import RankChecks, rank_trainer, write_from_rank_zero

from composer_thaw.models.builtin import tiny_decoder
from composer_thaw.recipes.running import parameter_checksum
from composer_thaw.regex_freeze import RegexFreeze
from composer_thaw.utils.parameter_selection import user_module

TRAINABLE = ['model.embed_tokens.weight[1000:2500]', 'lm_head.weight[1000:2500]', 'model.layers.1']
FROZEN = ['model.layers.1.mlp.up_proj.weight[0:16]']


def build(save_folder, load_path=None):
    reproducibility.seed_all(0)
    model = tiny_decoder(hidden_size=32, num_layers=2)
    check = RankChecks()
    algorithms = [
        RegexFreeze(trainable=TRAINABLE, frozen=FROZEN),
        GradientClipping(clipping_type='norm', clipping_threshold=0.1),
    ]
    trainer = rank_trainer(
        model,
        algorithms,
        check,
        blocks=64,
        batch_size=4,
        max_duration='6ba',
        save_folder=save_folder,
        save_interval='3ba',
        load_path=load_path,
        device_train_microbatch_size=2,
        save_overwrite=True,
    )
    return model, trainer, check


def main(out_path: str, checkpoint_dir: str) -> None:
    model, trainer, check = build(checkpoint_dir)
    initial = {name: p.detach().clone() for name, p in user_module(model).named_parameters()}
    trainer.fit()
    params = dict(user_module(model).named_parameters())
    selection = trainer.state.algorithms[0].selection
    frozen_exact, trainable_moved = True, True
    for name, param in params.items():
        mask = torch.zeros(param.shape[0], dtype=torch.bool)
        for start, end in selection[name].trainable_rows:
            mask[start:end] = True
        frozen_exact &= torch.equal(param.detach()[~mask], initial[name][~mask])
        if mask.any():
            trainable_moved &= not torch.equal(param.detach()[mask], initial[name][mask])
    optimizer = trainer.state.optimizers[0]
    trainable_ids = {id(params[name]) for name, t in selection.items() if t.trainable_rows}
    state_only_trainable = {id(p) for p in optimizer.state} == trainable_ids
    uninterrupted = parameter_checksum(model)
    different_data = check.ranks_read_different_data()
    identical = check.ranks_identical
    trainer.close()

    dist.barrier()
    resumed_model, resumed, resumed_check = build(
        os.path.join(checkpoint_dir, 'resumed'), load_path=os.path.join(checkpoint_dir, 'ep0-ba3-rank{rank}.pt')
    )
    resumed.fit()
    result = {
        'world_size': dist.get_world_size(),
        'ranks_read_different_data': different_data,
        'ranks_identical_after_every_batch': len(identical) == 6 and all(identical),
        'frozen_elements_exact_on_every_rank': all(dist.all_gather_object(bool(frozen_exact))),
        'trainable_rows_moved': all(dist.all_gather_object(bool(trainable_moved))),
        'optimizer_state_only_for_trainable': all(dist.all_gather_object(state_only_trainable)),
        'resumed_ranks_identical_after_every_batch': len(resumed_check.ranks_identical) == 3
        and all(resumed_check.ranks_identical),
        'resumed_equals_uninterrupted': all(dist.all_gather_object(parameter_checksum(resumed_model) == uninterrupted)),
    }
    resumed.close()
    write_from_rank_zero(out_path, result)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
