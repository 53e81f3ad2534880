"""Built-in models load offline and are what they claim to be."""

import torch

from composer_thaw.models.builtin import embedded_minilm_path, minilm_classifier, tiny_decoder
from composer_thaw.utils.parameter_selection import split_into_units, user_module


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


def test_a_tokenizer_without_any_special_token_gets_a_new_pad_token_and_a_row_for_it(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from composer_thaw.models.builtin import default_task, hf_model

    backend = Tokenizer(models.WordLevel({'a': 0, 'b': 1, 'c': 2}))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend).save_pretrained(tmp_path)
    config = LlamaConfig(vocab_size=3, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    assert default_task(AutoConfig.from_pretrained(tmp_path)) == 'causal_lm'

    model = hf_model(tmp_path, 'causal_lm')
    tokenizer, inner = model.tokenizer, model.model
    assert tokenizer.pad_token == '<pad>' and tokenizer.pad_token_id == 3
    assert inner.get_input_embeddings().num_embeddings == 4 and inner.config.pad_token_id == 3
    batch = dict(tokenizer(['a b c', 'a'], padding=True, return_tensors='pt'))
    batch['labels'] = batch['input_ids'].masked_fill(batch['attention_mask'] == 0, -100)
    assert torch.isfinite(model.loss(model(batch), batch))
