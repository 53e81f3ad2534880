"""Run under ``composer -n 2``: LoRAInject under DDP keeps ranks bit-identical and resumes exactly.

One launch checks, on 2 CPU processes (gloo), with each rank reading different data:
* after every batch, all parameters (adapters included) are bit-identical on both ranks;
* the base weights are bit-identical to the model before training (only adapters and modules_to_save move);
* frozen parameters never hold a gradient;
* a run resumed at world size 2 from a mid-run checkpoint (trainable-only: adapters, lm_head and a fingerprint of the
  frozen base, keys under DDP's wrapper) ends bit-identical to the uninterrupted run;
* the adapter written at FIT_END by rank 0 exists.
Rank 0 writes the findings as JSON to the path given as the first argument.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import torch
from composer.utils import dist
from rank_checks import RankChecks, rank_trainer, resumed_equals_uninterrupted, write_from_rank_zero

from composer_thaw.lora_inject import LoRAInject
from composer_thaw.models.builtin import tiny_decoder
from composer_thaw.utils.parameter_selection import user_module
from composer_thaw.utils.trainable_checkpoints import FINGERPRINT_KEY

OPTIONS = dict(
    r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'embed_tokens'], use_dora=True, modules_to_save=['lm_head']
)


def train(folder: str, load_path: str | None, seed: int):
    torch.manual_seed(seed)
    model = tiny_decoder('llama', num_layers=2, hidden_size=32, num_heads=4)
    base = {n: p.detach().clone() for n, p in user_module(model).named_parameters()}
    checks = RankChecks()
    algorithms = [LoRAInject(**OPTIONS, save_adapter_to=os.path.join(folder, 'adapter'))]
    # 16 blocks: 4 batches per rank and epoch
    save_folder = os.path.join(folder, 'checkpoints')
    rank_trainer(model, algorithms, checks, blocks=16, save_folder=save_folder, load_path=load_path).fit()
    return model, base, checks


def main(out: str, folder: str) -> None:
    model, base, checks = train(folder, None, seed=0)
    after = dict(user_module(model).named_parameters())
    base_unchanged = all(
        torch.equal(after.get(n, after.get(n.rsplit('.', 1)[0] + '.base_layer.' + n.rsplit('.', 1)[1])), v)
        for n, v in base.items()
        if not n.startswith('lm_head')
    )
    different_data = checks.ranks_read_different_data()
    checkpoint = next(f for f in sorted(os.listdir(os.path.join(folder, 'checkpoints'))) if '-ba4-rank0' in f)
    # the default trainable-only checkpoint: the resumed run builds the same base (seed 0) and loads the adapters
    saved = torch.load(os.path.join(folder, 'checkpoints', checkpoint), map_location='cpu', weights_only=False)
    saved_model = saved['state']['model']
    resumed, _, resumed_checks = train(folder, os.path.join(folder, 'checkpoints', checkpoint), seed=0)
    result = {
        'world_size': dist.get_world_size(),
        'ranks_read_different_data': different_data,
        'ranks_identical_after_every_batch': all(checks.ranks_identical) and len(checks.ranks_identical) == 8,
        'base_unchanged': base_unchanged,
        'frozen_params_with_grad': checks.frozen_grads,
        'resumed_ranks_identical_after_every_batch': all(resumed_checks.ranks_identical),
        'resumed_equals_uninterrupted': resumed_equals_uninterrupted(model, resumed),
        'adapter_saved': os.path.exists(os.path.join(folder, 'adapter', 'adapter_model.safetensors')),
        'checkpoint_without_frozen_base': FINGERPRINT_KEY in saved_model
        and 'model.model.layers.0.self_attn.q_proj.base_layer.weight' in saved_model[FINGERPRINT_KEY]['frozen']
        and not any(key.endswith('base_layer.weight') for key in saved_model),
    }
    write_from_rank_zero(out, result)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
