"""``task_type`` means what it means in PEFT: ``SEQ_CLS`` and ``TOKEN_CLS`` train ``classifier``/``score`` in full,
``QUESTION_ANS`` trains ``qa_outputs`` (PEFT's task models add them to ``modules_to_save``), the other task types
change nothing that trains. The same modules train here and in PEFT; the adapter's ``adapter_config.json`` records
the task type, so ``peft.PeftModel.from_pretrained`` builds PEFT's task model, with equal outputs, and an adapter
PEFT saved for a task loads here with its task type."""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch

from composer_thaw.lora_inject import LoRAConfig, LoRAInject, apply_lora, load_adapter, lora_config_of, save_adapter

from .helpers import randomize_peft_adapters, randomize_trainable


def _bert(head: str):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.BertConfig(
        vocab_size=100,
        hidden_size=16,
        num_attention_heads=2,
        intermediate_size=32,
        num_hidden_layers=2,
        num_labels=2 if head == 'ForQuestionAnswering' else 3,
    )
    return getattr(tf, f'Bert{head}')(config).eval()


def _distilbert():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.DistilBertConfig(vocab_size=100, dim=16, n_layers=2, n_heads=2, hidden_dim=32, num_labels=3)
    return tf.DistilBertForSequenceClassification(config).eval()


def _llama(head: str):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=100,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        num_labels=3,
        pad_token_id=0,
    )
    return getattr(tf, f'Llama{head}')(config).eval()


# name -> (task type, model, target_modules)
CASES = {
    'SEQ_CLS-bert': ('SEQ_CLS', lambda: _bert('ForSequenceClassification'), ['query', 'value']),
    'SEQ_CLS-distilbert': ('SEQ_CLS', _distilbert, ['q_lin', 'v_lin']),  # suffix rule: pre_classifier trains too
    'SEQ_CLS-llama-score': ('SEQ_CLS', lambda: _llama('ForSequenceClassification'), ['q_proj', 'v_proj']),
    'TOKEN_CLS': ('TOKEN_CLS', lambda: _bert('ForTokenClassification'), ['query', 'value']),
    'QUESTION_ANS': ('QUESTION_ANS', lambda: _bert('ForQuestionAnswering'), ['query', 'value']),
    'FEATURE_EXTRACTION': ('FEATURE_EXTRACTION', lambda: _bert('Model'), ['query', 'value']),
    'CAUSAL_LM': ('CAUSAL_LM', lambda: _llama('ForCausalLM'), ['q_proj']),
}


def _output(model, inputs):
    with torch.no_grad():
        out = model(**inputs)
    for key in ('logits', 'start_logits', 'last_hidden_state'):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    raise AssertionError(f'no output tensor in {type(out).__name__}')


def _inputs():
    torch.manual_seed(5)
    return {'input_ids': torch.randint(1, 100, (2, 8)), 'attention_mask': torch.ones(2, 8, dtype=torch.long)}


def _trained_modules_ours(model) -> set[tuple[str, str]]:
    trained = set()
    for name, param in model.named_parameters():
        if param.requires_grad:
            if '.lora_' in name:
                trained.add((name.split('.lora_')[0], 'adapter'))
            else:
                trained.add((name.rsplit('.', 1)[0], 'full'))
    return trained


def _trained_modules_peft(peft_model) -> set[tuple[str, str]]:
    trained = set()
    for name, param in peft_model.named_parameters():
        if param.requires_grad:
            name = name.removeprefix('base_model.model.')
            if '.lora_' in name:
                trained.add((name.split('.lora_')[0], 'adapter'))
            else:
                trained.add((re.sub(r'\.modules_to_save\.default', '', name).rsplit('.', 1)[0], 'full'))
    return trained


@pytest.mark.parametrize('case', list(CASES))
def test_the_same_modules_train_as_in_peft_and_the_saved_adapter_loads_as_peft_s_task_model(case, tmp_path):
    import peft

    task_type, make, targets = CASES[case]
    base = make()
    ours = copy.deepcopy(base)
    apply_lora(ours, r=2, lora_alpha=4, target_modules=targets, task_type=task_type)
    reference = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, task_type=task_type)
    )
    assert _trained_modules_ours(ours) == _trained_modules_peft(reference)

    randomize_trainable(ours)
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / 'adapter_config.json').read_text())['task_type'] == task_type
    theirs = peft.PeftModel.from_pretrained(base, tmp_path)
    assert type(theirs) is peft.MODEL_TYPE_TO_PEFT_MODEL_MAPPING[task_type]
    torch.testing.assert_close(_output(theirs, _inputs()), _output(ours, _inputs()), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('case', ['SEQ_CLS-distilbert', 'QUESTION_ANS'])
def test_an_adapter_peft_saved_for_a_task_loads_with_its_task_type(case, tmp_path):
    import peft

    task_type, make, targets = CASES[case]
    base = make()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=targets, task_type=task_type)
    )
    randomize_peft_adapters(theirs)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if 'modules_to_save' in name:
                param.add_(0.1)
    theirs.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path)
    assert lora_config_of(ours).task_type == task_type
    torch.testing.assert_close(_output(ours, _inputs()), _output(theirs, _inputs()), atol=1e-5, rtol=1e-4)


def test_task_heads_are_added_to_modules_to_save_once():
    assert LoRAConfig(task_type='SEQ_CLS').saved_entries() == ['classifier', 'score']
    assert LoRAConfig(task_type='TOKEN_CLS', modules_to_save=['score']).saved_entries() == ['score', 'classifier']
    assert LoRAConfig(task_type='QUESTION_ANS').saved_entries() == ['qa_outputs']
    for task_type in ('CAUSAL_LM', 'SEQ_2_SEQ_LM', 'FEATURE_EXTRACTION', None):
        assert LoRAConfig(task_type=task_type, modules_to_save=['lm_head']).saved_entries() == ['lm_head']


def test_an_unknown_task_type_is_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"task_type='SEQ_CLASSIFICATION' is invalid: choose one of 'SEQ_CLS', "):
        LoRAConfig(task_type='SEQ_CLASSIFICATION')  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r'algorithms.lora_inject.task_type.*SEQ_CLS'):
        LoRAInject(task_type='seq_cls')  # type: ignore[arg-type]
    assert eval(repr(LoRAInject(task_type='SEQ_CLS')), {'LoRAInject': LoRAInject}) == LoRAInject(task_type='SEQ_CLS')


def test_a_task_type_whose_heads_the_model_lacks_warns_and_trains_only_the_adapters():
    model = _llama('ForCausalLM')
    with pytest.warns(UserWarning, match=r"task_type='SEQ_CLS' trains the heads named \['classifier', 'score'\]"):
        apply_lora(model, r=2, target_modules=['q_proj'], task_type='SEQ_CLS')
    assert all('lora_' in n for n, p in model.named_parameters() if p.requires_grad)
