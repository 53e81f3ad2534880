"""master_weights='fp32': bf16 weights, fp32 masters and optimizer state only for what trains (issue #13)."""

from __future__ import annotations

import pytest
import torch
from support import seeded_tiny_decoder
from torch import nn

from composer_thaw.core.validation import ConfigError
from composer_thaw.hift_rotation import GroupRotation, HiFTRotation
from composer_thaw.layer_freezing import LayerFreezing, freeze_units
from composer_thaw.layer_freezing.units import freezable_units
from composer_thaw.lora_inject import LoRAInject, apply_lora
from composer_thaw.regex_freeze import RegexFreeze, apply_regex_freeze
from composer_thaw.utils.master_weights import enable_master_weights, master_weights_of

BF16 = torch.bfloat16


def bf16_decoder() -> nn.Module:
    return seeded_tiny_decoder(num_layers=2).model.to(BF16)  # the Hugging Face model inside Composer's wrapper


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, seed: int = 0) -> None:
    tokens = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(seed))
    model(input_ids=tokens, labels=tokens).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def fp32_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Every fp32 byte training holds: fp32 parameters, masters and optimizer state."""
    masters = master_weights_of(optimizer)
    params = sum(p.numel() * 4 for p in model.parameters() if p.dtype == torch.float32)
    state = sum(
        v.numel() * 4
        for s in optimizer.state.values()
        for k, v in s.items()
        if k != 'step' and isinstance(v, torch.Tensor) and v.dtype == torch.float32
    )
    return params + state + (masters.master_bytes() if masters else 0)


def assert_masters_are_the_weights(optimizer: torch.optim.Optimizer) -> None:
    masters = master_weights_of(optimizer)
    assert masters is not None
    for param, master in masters.masters.values():
        assert param.dtype == BF16 and master.dtype == torch.float32
        assert torch.equal(master.to(BF16), param.detach())


def test_an_update_below_bf16_resolution_reaches_the_weight_through_the_master():
    # Just below 1.0 bf16's spacing is 2**-8: an SGD step of 2**-10 rounds back to 1.0 in bf16, every time.
    pure, mastered = (nn.Parameter(torch.ones(8, dtype=BF16)) for _ in range(2))
    pure_sgd, mastered_sgd = torch.optim.SGD([pure], lr=1.0), torch.optim.SGD([mastered], lr=1.0)
    masters = enable_master_weights(nn.ParameterList([mastered]), mastered_sgd, 'fp32')
    assert masters is not None
    for step in range(1, 9):
        for param, optimizer in ((pure, pure_sgd), (mastered, mastered_sgd)):
            param.grad = torch.full_like(param, 2**-10)
            optimizer.step()
        master = masters.master_of(mastered)
        assert master is not None and master.dtype == torch.float32
        assert torch.equal(master, torch.full((8,), 1 - step * 2**-10)), 'the master lost an update'
        assert torch.equal(mastered.detach(), master.to(BF16)), 'the weight is not the master, cast'
        if step == 1:  # 1 - 2**-10 still rounds to 1.0: the update waits in the master
            assert torch.equal(mastered.detach(), torch.ones(8, dtype=BF16))
    assert torch.equal(pure.detach(), torch.ones(8, dtype=BF16)), 'pure bf16 kept the updates'
    assert torch.equal(mastered.detach(), torch.full((8,), 1 - 8 * 2**-10, dtype=BF16))  # 0.9921875, exact in bf16


def test_a_weight_written_in_place_between_steps_goes_into_its_master_and_an_unwritten_one_is_not_compared(monkeypatch):
    # Masters hold 1 - 2**-10 (the weight still reads 1.0 in bf16). A weight written in place between steps
    # (load_state_dict, copy_) is taken into its master before the next step; the master of one nobody wrote keeps
    # the update below bf16's resolution, and no step compares it (the weight's version counter says it is unwritten).
    written, untouched, through_data = (nn.Parameter(torch.ones(8, dtype=BF16)) for _ in range(3))
    model = nn.ParameterList([written, untouched, through_data])
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    masters = enable_master_weights(model, sgd, 'fp32')
    assert masters is not None

    def step() -> None:
        for param in model:
            param.grad = torch.full_like(param, 2**-10)
        sgd.step()

    step()
    with torch.no_grad():
        written.copy_(torch.full((8,), 4.0))  # as load_state_dict writes
        through_data.data.copy_(torch.full((8,), 4.0))  # bypasses the version counter
    step()
    assert torch.equal(masters.master_of(written), torch.full((8,), 4 - 2**-10)), 'the written weight was lost'
    assert torch.equal(masters.master_of(untouched), torch.full((8,), 1 - 2 * 2**-10)), 'an update was lost'
    # ``.data`` writes are not seen: the master stepped on and its cast overwrote the write ...
    assert torch.equal(through_data.detach(), torch.full((8,), 1 - 2 * 2**-10, dtype=BF16))
    with torch.no_grad():
        through_data.data.copy_(torch.full((8,), 4.0))
    masters.refresh()  # ... unless refresh() is called after them
    assert torch.equal(masters.master_of(through_data), torch.full((8,), 4.0))
    compared: list[torch.Tensor] = []
    not_equal = torch.Tensor.__ne__
    monkeypatch.setattr(torch.Tensor, '__ne__', lambda a, b: (compared.append(a), not_equal(a, b))[-1])
    step()
    assert compared == [], 'a step with no outside write compared weights with their masters'
    monkeypatch.undo()
    assert_masters_are_the_weights(sgd)


def test_optimizer_state_is_fp32_and_survives_a_state_dict_round_trip():
    model = bf16_decoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    enable_master_weights(model, optimizer, 'fp32')
    train_step(model, optimizer)
    saved = optimizer.state_dict()
    assert all(v.dtype == torch.float32 for s in saved['state'].values() for v in s.values())
    fresh = torch.optim.AdamW(model.parameters(), lr=1e-3)
    enable_master_weights(model, fresh, 'fp32')
    fresh.load_state_dict(saved)
    for param, state in optimizer.state.items():
        for key, value in state.items():
            assert fresh.state[param][key].dtype == torch.float32
            assert torch.equal(fresh.state[param][key], value), f'{key} changed in the round trip'


def test_regex_freeze_masters_only_the_trainable_set_and_frozen_rows_keep_their_bits():
    model = bf16_decoder()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    apply_regex_freeze(model, optimizer, trainable=['model.layers.1.mlp', 'model.embed_tokens.weight[0:500]'])
    masters = enable_master_weights(model, optimizer, 'fp32')
    assert masters is not None
    trainable = [p for p in model.parameters() if p.requires_grad]
    for step in range(3):
        train_step(model, optimizer, step)
        assert_masters_are_the_weights(optimizer)
        # fp32 bytes: a master and two Adam moments per trainable element, nothing for the frozen ones
        assert fp32_bytes(model, optimizer) == 12 * sum(p.numel() for p in trainable)
    embed = model.model.embed_tokens.weight.detach()
    assert torch.equal(embed[500:], before['model.embed_tokens.weight'][500:]), 'frozen rows moved'
    assert not torch.equal(embed[:500], before['model.embed_tokens.weight'][:500])
    for name, param in model.named_parameters():
        if not param.requires_grad:
            assert torch.equal(param.detach(), before[name]), f'frozen {name} moved'


def test_layer_freezing_frees_the_masters_of_frozen_units():
    model = bf16_decoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    masters = enable_master_weights(model, optimizer, 'fp32')
    assert masters is not None
    train_step(model, optimizer)
    everything = masters.master_bytes()
    assert everything == 4 * sum(p.numel() for p in model.parameters())
    units = freezable_units(model, 'block')
    frozen = freeze_units(model, optimizer, units[:2])
    assert masters.master_bytes() == everything - 4 * sum(p.numel() for p in frozen)
    assert all(masters.master_of(p) is None for p in frozen)
    train_step(model, optimizer, 1)
    assert_masters_are_the_weights(optimizer)
    assert fp32_bytes(model, optimizer) == 12 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_hift_holds_masters_only_for_the_active_group():
    model = bf16_decoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    rotation = GroupRotation(model, optimizer, group_size=1, master_weights='fp32')
    masters = master_weights_of(optimizer)
    assert masters is not None
    seen = set()
    for step in range(5):  # embeddings, two blocks, norm, head
        rotation.before_step()
        active = rotation.active_params
        assert {id(p) for p in active} == set(masters.masters), 'masters outside the active group'
        seen.add(rotation.active)
        train_step(model, optimizer, step)
        assert_masters_are_the_weights(optimizer)
        # fp32 on the model: the active group's master and state; the others' state is offloaded
        on_device = 4 * sum(p.numel() for p in active) + sum(
            v.numel() * 4 for s in optimizer.state.values() for k, v in s.items() if k != 'step'
        )
        assert fp32_bytes(model, optimizer) == on_device == 12 * sum(p.numel() for p in active)
    assert len(seen) == 5
    assert rotation.metrics()['master_weight_bytes'] == masters.master_bytes()


def test_lora_keeps_the_base_bf16_adapters_fp32_and_masters_modules_to_save():
    model = bf16_decoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    apply_lora(model, optimizer, r=4, target_modules=['q_proj', 'v_proj'], modules_to_save=['lm_head'])
    masters = enable_master_weights(model, optimizer, 'fp32')
    assert masters is not None
    train_step(model, optimizer)
    adapters = {n: p for n, p in model.named_parameters() if 'lora_' in n}
    assert adapters and all(p.dtype == torch.float32 for p in adapters.values())
    assert all(p.dtype == BF16 for n, p in model.named_parameters() if 'lora_' not in n)
    mastered = {n for n, p in model.named_parameters() if masters.master_of(p) is not None}
    assert mastered and all('lm_head' in n for n in mastered)
    assert_masters_are_the_weights(optimizer)


def test_an_fp32_model_needs_no_masters():
    model = seeded_tiny_decoder(num_layers=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    masters = enable_master_weights(model, optimizer, 'fp32')
    assert masters is not None and masters.master_bytes() == 0


@pytest.mark.parametrize('cls', [HiFTRotation, LayerFreezing, RegexFreeze, LoRAInject])
@pytest.mark.parametrize('value', ['bf16', 'FP32', True])
def test_a_bad_mode_names_the_value_and_the_choices(cls, value):
    kwargs = {'trainable': ['lm_head']} if cls is RegexFreeze else {}
    with pytest.raises(ConfigError) as error:
        cls(master_weights=value, **kwargs)
    assert 'master_weights' in str(error.value) and repr(value) in str(error.value) and "'fp32'" in str(error.value)


@pytest.mark.parametrize('cls', [HiFTRotation, LayerFreezing, RegexFreeze, LoRAInject])
def test_the_option_round_trips_through_repr(cls):
    kwargs = {'trainable': ['lm_head']} if cls is RegexFreeze else {}
    algorithm = cls(master_weights='fp32', **kwargs)
    assert "master_weights='fp32'" in repr(algorithm)
    assert 'master_weights' not in repr(cls(**kwargs))


def test_lora_export_with_masters_has_the_dtypes_peft_writes(tmp_path):
    """PEFT on a bf16 model (autocast_adapter_dtype=True, its default) saves fp32 adapters and bf16 modules_to_save."""
    import copy

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from composer_thaw.lora_inject.peft_format import save_adapter

    base = bf16_decoder()
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, target_modules=['q_proj', 'v_proj'], modules_to_save=['lm_head'])
    )
    peft_model.save_pretrained(tmp_path / 'peft')
    optimizer = torch.optim.AdamW(base.parameters(), lr=1e-3)
    apply_lora(base, optimizer, r=4, target_modules=['q_proj', 'v_proj'], modules_to_save=['lm_head'])
    enable_master_weights(base, optimizer, 'fp32')
    train_step(base, optimizer)
    save_adapter(base, tmp_path / 'ours')

    theirs = load_file(tmp_path / 'peft' / 'adapter_model.safetensors')
    ours = load_file(tmp_path / 'ours' / 'adapter_model.safetensors')
    assert ours.keys() == theirs.keys()
    assert {k: v.dtype for k, v in ours.items()} == {k: v.dtype for k, v in theirs.items()}
    assert {v.dtype for k, v in ours.items() if 'lora_' in k} == {torch.float32}
    assert {v.dtype for k, v in ours.items() if 'lora_' not in k} == {BF16}


def test_bf16_adapters_are_exported_from_their_fp32_masters_with_the_dtypes_peft_writes(tmp_path):
    """Under FSDP2 adapters keep a bf16 base's dtype (adapters_in_base_dtype) and train through fp32 masters; the
    export writes the masters, so the file is what PEFT (fp32 adapters) writes and loses no precision."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from composer_thaw.lora_inject.injection import adapter_layers
    from composer_thaw.lora_inject.peft_format import save_adapter
    from composer_thaw.lora_inject.surgery import adapters_in_base_dtype

    model = bf16_decoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    apply_lora(model, optimizer, r=4, target_modules=['q_proj', 'v_proj'], modules_to_save=['lm_head'])
    adapters_in_base_dtype(model)
    masters = enable_master_weights(model, optimizer, 'fp32')
    assert masters is not None
    for seed in range(3):
        train_step(model, optimizer, seed)
    save_adapter(model, tmp_path / 'adapter', masters=masters)
    save_adapter(model, tmp_path / 'weights')  # without the masters: the bf16 weights as they are

    saved, weights = (load_file(tmp_path / name / 'adapter_model.safetensors') for name in ('adapter', 'weights'))
    exported = 0
    for name, layer in adapter_layers(model).items():
        for attr in ('lora_A', 'lora_B'):
            key = f'base_model.model.{name}.{attr}.weight'
            master = masters.master_of(getattr(layer, attr))
            assert master is not None and saved[key].dtype == torch.float32 and torch.equal(saved[key], master)
            assert weights[key].dtype == BF16 and torch.equal(weights[key], getattr(layer, attr).detach())
            exported += 1
    assert exported == 2 * 2 * 2  # 2 blocks x (q_proj, v_proj) x (A, B)
    assert {v.dtype for k, v in saved.items() if 'lora_' not in k} == {BF16}  # modules_to_save: the model's dtype
    assert any(not torch.equal(saved[k].to(BF16).float(), saved[k]) for k in saved if 'lora_B' in k)  # finer than bf16

    loaded = PeftModel.from_pretrained(bf16_decoder(), tmp_path / 'adapter')
    assert loaded.base_model.model.model.layers[0].self_attn.q_proj.lora_A['default'].weight.dtype == torch.float32


@pytest.mark.multiprocess
def test_two_process_ddp_keeps_ranks_and_masters_identical_and_resumes_exactly(two_processes):
    import json

    from support import two_process_part

    result = json.loads((two_process_part(two_processes, 'master_weights') / 'result.json').read_text())
    assert result['world_size'] == 2
    assert result['ranks_read_different_data']  # so identical ranks mean gradients really were all-reduced
    assert result['batches'] == 8
    assert result['weights_bf16'] and result['masters_held']
    assert result['ranks_identical_after_every_batch']
    assert result['masters_are_weights_after_every_batch']
    assert result['masters_identical_on_ranks']
    assert result['reference_steps'] == 8 and result['reference_failures'] == [[], []], 'a rank lost an update'
    assert result['resumed_equals_uninterrupted']


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU: torch.cuda.max_memory_allocated')
def test_gpu_peak_of_a_1b_model_is_the_estimate_plus_activations():
    """Issue #13: a 1.1B LLaMA in bf16, HiFT group_size 1 over its blocks with fp32 masters; the peak allocated memory
    over a few steps is within 5% of the estimator's training state plus the activations measured alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from composer_thaw.recipes.memory_estimate import estimate_training_state, spec_of

    config = LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
        vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device('cuda'):
        model = LlamaForCausalLM(config).to(BF16)
    assert sum(p.numel() for p in model.parameters()) > 1e9
    tokens = torch.randint(0, 32000, (2, 256), device='cuda')
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = model(input_ids=tokens, labels=tokens).loss  # the forward pass's saved activations, measured alone
    activations = torch.cuda.max_memory_allocated() - before
    del loss
    model.zero_grad(set_to_none=True)
    freeze = [0, config.num_hidden_layers + 1, config.num_hidden_layers + 2]  # embeddings, final norm, head
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rotation = GroupRotation(model, optimizer, group_size=1, freeze=freeze, master_weights='fp32')
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(3):
        rotation.before_step()
        model(input_ids=tokens, labels=tokens).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    options = {'group_size': 1, 'freeze': freeze, 'master_weights': 'fp32'}
    predicted = estimate_training_state(spec_of(model), 'hift_rotation', options, dtype=BF16).training_state_bytes
    assert abs(peak - (predicted + activations)) <= 0.05 * (predicted + activations), (peak, predicted, activations)


def test_training_state_counts_the_masters_and_the_run_summary_shows_them():
    from composer_thaw.recipes.running import RunSummary, format_summary
    from composer_thaw.utils.optimizer_surgery import training_state_bytes

    model = bf16_decoder()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    apply_regex_freeze(model, optimizer, trainable=['model.layers.1'])
    before = training_state_bytes(model, optimizer)
    enable_master_weights(model, optimizer, 'fp32')
    train_step(model, optimizer)
    counts = training_state_bytes(model, optimizer)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert before.masters == 0 and counts.masters == 4 * trainable > 0
    assert counts.total == counts.params + counts.grads + counts.optimizer_state + counts.masters

    summary = RunSummary(param_bytes=counts.params, optimizer_state_bytes=counts.optimizer_state)
    assert '  fp32 masters' not in format_summary(summary)  # a run without masters shows no such row
    summary.master_bytes = counts.masters
    assert summary.training_state_bytes == counts.total
    assert '  fp32 masters' in format_summary(summary)
