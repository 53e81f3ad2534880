"""The built-in data sets are real text, fixed, balanced enough, and split without leakage."""

import hashlib

from composer_thaw.datasets import builtin as data
from composer_thaw.models.builtin import load_tokenizer


def _fingerprint(examples):
    return hashlib.sha256('\n'.join(f'{e.label}\t{e.text}' for e in examples).encode()).hexdigest()


def test_docstring_task_is_deterministic_across_calls():
    first = data.stdlib_docs_examples()
    data.stdlib_docs_examples.cache_clear()
    second = data.stdlib_docs_examples()
    assert _fingerprint(first[0]) == _fingerprint(second[0])
    assert _fingerprint(first[1]) == _fingerprint(second[1])


def test_docstring_task_has_at_least_four_classes_and_disjoint_splits():
    train, eval_ = data.stdlib_docs_examples()
    assert len(data.STDLIB_DOCS_CLASSES) >= 4
    assert {e.label for e in train} == {e.label for e in eval_} == set(range(len(data.STDLIB_DOCS_CLASSES)))
    assert not {e.text for e in train} & {e.text for e in eval_}
    assert len(train) > 1000 and len(eval_) > 200
    counts = [sum(e.label == label for e in eval_) for label in range(len(data.STDLIB_DOCS_CLASSES))]
    assert max(counts) / len(eval_) < 0.3  # no class dominates: accuracy must be earned


def test_split_depends_on_the_text_only():
    train, eval_ = data.stdlib_docs_examples(max_per_class=100)
    full_train, full_eval = data.stdlib_docs_examples()
    assert {e.text for e in eval_} <= {e.text for e in full_eval}
    assert {e.text for e in train} <= {e.text for e in full_train}


def test_language_modelling_blocks_are_fixed_length_and_labelled_with_inputs():
    tokenizer = load_tokenizer()
    train_texts, eval_texts = data.python_topics_corpus()
    assert train_texts and eval_texts and not set(train_texts) & set(eval_texts)
    dataset = data.LanguageModelingDataset(train_texts, tokenizer, max_seq_len=32, max_blocks=10)
    assert len(dataset) == 10
    item = dataset[3]
    assert item['input_ids'].shape == (32,)
    assert (item['labels'] == item['input_ids']).all()


def test_loader_uses_composers_distributed_sampler():
    from composer.utils import dist

    tokenizer = load_tokenizer()
    dataset = data.ClassificationDataset(data.stdlib_docs_examples()[0][:40], tokenizer, 32)
    loader = data.build_dataloader(dataset, tokenizer, batch_size=8, shuffle=True, drop_last=True)
    assert type(loader.sampler) is type(dist.get_sampler(dataset, shuffle=True))
    batch = next(iter(loader))
    assert batch['input_ids'].shape[0] == 8 and batch['labels'].shape == (8,)
