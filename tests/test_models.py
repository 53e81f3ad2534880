"""Built-in models load offline and are what they claim to be."""

import torch

from composer_thaw.models import embedded_minilm_path, minilm_classifier, tiny_decoder
from composer_thaw.parameter_selection import split_into_units, user_module


def test_minilm_loads_the_pretrained_weights_offline():
    from safetensors.torch import load_file

    model = minilm_classifier(num_labels=4)
    saved = load_file(str(embedded_minilm_path() / 'model.safetensors'))
    inner = user_module(model)
    weight = inner.bert.encoder.layer[0].attention.self.query.weight
    key = next(k for k in saved if k.endswith('encoder.layer.0.attention.self.query.weight'))
    assert torch.equal(weight, saved[key])
    assert 22_000_000 < sum(p.numel() for p in model.parameters()) < 23_000_000


def test_tiny_decoders_run_a_causal_lm_step():
    for arch in ('llama', 'gpt2'):
        model = tiny_decoder(arch=arch, num_layers=2, hidden_size=32)
        batch = {'input_ids': torch.randint(0, 1000, (2, 16)), 'labels': torch.randint(0, 1000, (2, 16))}
        loss = model.loss(model(batch), batch)
        loss.backward()
        assert torch.isfinite(loss)
        assert len([u for u in split_into_units(user_module(model)) if u.kind == 'block']) == 2


def test_tiny_decoder_init_follows_the_torch_seed():
    torch.manual_seed(3)
    first = tiny_decoder(num_layers=1, hidden_size=16)
    torch.manual_seed(3)
    second = tiny_decoder(num_layers=1, hidden_size=16)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
