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

import json
import os
import sys

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import torch
from composer import Trainer
from composer.utils import dist
from rank_checks import RankChecks

from composer_thaw.data import LanguageModelingDataset, build_dataloader, python_topics_corpus
from composer_thaw.lora_inject import LoRAInject
from composer_thaw.models import load_tokenizer, tiny_decoder
from composer_thaw.parameter_selection import user_module
from composer_thaw.trainable_checkpoints import FINGERPRINT_KEY
from composer_thaw.training import parameter_checksum

OPTIONS = dict(
    r=4, lora_alpha=8, target_modules=['q_proj', 'v_proj', 'embed_tokens'], use_dora=True, modules_to_save=['lm_head']
)


def train(folder: str, load_path: str | None, seed: int):
    tokenizer = load_tokenizer()
    dataset = LanguageModelingDataset(python_topics_corpus()[0], tokenizer, max_seq_len=32, max_blocks=16)
    loader = build_dataloader(dataset, tokenizer, batch_size=2, shuffle=True, drop_last=True)  # 4 batches per rank
    torch.manual_seed(seed)
    model = tiny_decoder('llama', num_layers=2, hidden_size=32, num_heads=4)
    base = {n: p.detach().clone() for n, p in user_module(model).named_parameters()}
    checks = RankChecks()
    Trainer(
        model=model,
        train_dataloader=loader,
        max_duration='2ep',
        optimizers=torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
        algorithms=[LoRAInject(**OPTIONS, save_adapter_to=os.path.join(folder, 'adapter'))],
        callbacks=[checks],
        device='cpu',
        progress_bar=False,
        log_to_console=False,
        seed=17,
        save_folder=os.path.join(folder, 'checkpoints') if load_path is None else None,
        save_interval='4ba',
        load_path=load_path,
    ).fit()
    return model, base, checks


def main(out: str, folder: str) -> None:
    model, base, checks = train(folder, None, seed=0)
    after = dict(user_module(model).named_parameters())
    base_unchanged = all(
        torch.equal(after.get(n, after.get(n.rsplit('.', 1)[0] + '.base_layer.' + n.rsplit('.', 1)[1])), v)
        for n, v in base.items()
        if not n.startswith('lm_head')
    )
    first_batches = dist.all_gather_object(checks.first_batch_digest)
    checkpoint = next(f for f in sorted(os.listdir(os.path.join(folder, 'checkpoints'))) if '-ba4-rank0' in f)
    # the default trainable-only checkpoint: the resumed run builds the same base (seed 0) and loads the adapters
    saved = torch.load(os.path.join(folder, 'checkpoints', checkpoint), map_location='cpu', weights_only=False)
    saved_model = saved['state']['model']
    resumed, _, resumed_checks = train(folder, os.path.join(folder, 'checkpoints', checkpoint), seed=0)
    if dist.get_global_rank() == 0:
        result = {
            'world_size': dist.get_world_size(),
            'ranks_read_different_data': len(set(first_batches)) == 2,
            'ranks_identical_after_every_batch': all(checks.ranks_identical) and len(checks.ranks_identical) == 8,
            'base_unchanged': base_unchanged,
            'frozen_params_with_grad': checks.frozen_grads,
            'resumed_ranks_identical_after_every_batch': all(resumed_checks.ranks_identical),
            'resumed_equals_uninterrupted': parameter_checksum(resumed) == parameter_checksum(model),
            'adapter_saved': os.path.exists(os.path.join(folder, 'adapter', 'adapter_model.safetensors')),
            'checkpoint_without_frozen_base': FINGERPRINT_KEY in saved_model
            and 'model.model.layers.0.self_attn.q_proj.base_layer.weight' in saved_model[FINGERPRINT_KEY]['frozen']
            and not any(key.endswith('base_layer.weight') for key in saved_model),
        }
        with open(out, 'w') as f:
            json.dump(result, f)


if __name__ == '__main__':
    main(sys.argv[1], sys.argv[2])
