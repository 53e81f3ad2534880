"""Local files become tokenized task data: labels from the training rows, loss on responses only, packing into full
blocks; every problem with the files is one ConfigError naming the recipe key, the value and what is valid."""

import copy
import json
from pathlib import Path

import datasets
import pytest

from composer_thaw.core.validation import ConfigError
from composer_thaw.datasets.local_files import (
    IGNORE_INDEX,
    causal_lm_examples,
    instruction_examples,
    label_names_of,
    load_table,
    load_task_data,
)
from composer_thaw.models.builtin import load_tokenizer

PAIRS = [{'prompt': f'what is {i} plus {i}?', 'response': f'it is {2 * i}.'} for i in range(10)]
REVIEWS = 'text,label\n' + ''.join(f'review number {i},{("bad", "good", "fine")[i % 3]}\n' for i in range(12))
# A template in the style of chat models' (role markers, generation prompt) that the BERT vocabulary can spell.
CHAT_TEMPLATE = (
    '{% for m in messages %}[ {{ m.role }} ] {{ m.content }} {% endfor %}{% if add_generation_prompt %}[ assistant ] '
    '{% endif %}'
)


def _jsonl(path: Path, rows) -> Path:
    path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
    return path


@pytest.fixture(scope='module')
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope='module')
def chat_tokenizer():
    chat = copy.deepcopy(load_tokenizer())
    chat.chat_template = CHAT_TEMPLATE
    return chat


def test_every_format_and_a_save_to_disk_folder_load_the_same_rows(tmp_path):
    rows = {'text': ['a first text', 'a second one'], 'label': ['x', 'y']}
    table = datasets.Dataset.from_dict(rows)
    table.to_json(tmp_path / 'rows.jsonl')
    table.to_csv(tmp_path / 'rows.csv', index=False)
    table.to_parquet(tmp_path / 'rows.parquet')
    table.save_to_disk(str(tmp_path / 'saved'))  # datasets 3 with fsspec 2023 takes no Path
    for source in ('rows.jsonl', 'rows.csv', 'rows.parquet', 'saved', ['rows.jsonl', 'rows.jsonl'], 'rows.*l'):
        named = [str(tmp_path / s) for s in source] if isinstance(source, list) else str(tmp_path / source)
        loaded = load_table('data.train', named)
        expected = 2 if not isinstance(source, list) else 4
        assert len(loaded) == expected and loaded[1] == {'text': 'a second one', 'label': 'y'}, source
    import gzip

    (tmp_path / 'rows.jsonl.gz').write_bytes(gzip.compress((tmp_path / 'rows.jsonl').read_bytes()))
    assert list(load_table('data.train', str(tmp_path / 'rows.jsonl.gz'))['label']) == ['x', 'y']
    (tmp_path / 'lines.txt').write_text('one line\ntwo lines\n')
    assert list(load_table('data.train', str(tmp_path / 'lines.txt'))['text']) == ['one line', 'two lines']


def test_labels_come_from_the_training_rows_and_keep_their_names(tmp_path, tokenizer):
    (tmp_path / 'train.csv').write_text(REVIEWS)
    (tmp_path / 'eval.csv').write_text('text,label\nanother review,good\nand one more,bad\n')
    data = load_task_data('classification', tokenizer, str(tmp_path / 'train.csv'), str(tmp_path / 'eval.csv'))
    assert data.label_names == ('bad', 'fine', 'good')
    assert [row['labels'] for row in data.eval.rows] == [2, 0]
    assert data.majority_rate == 0.5
    batch = next(iter(data.train_loader(batch_size=4)))
    assert batch['input_ids'].shape[0] == 4 and batch['labels'].shape == (4,)
    numbers = datasets.Dataset.from_dict({'label': [10, 2, 2, 1]})
    assert label_names_of(numbers, 'label') == ('1', '2', '10')  # numerically, not as text
    named = datasets.Dataset.from_dict(
        {'label': [0, 1]}, features=datasets.Features({'label': datasets.ClassLabel(names=['no', 'yes', 'maybe'])})
    )
    assert label_names_of(named, 'label') == ('no', 'yes', 'maybe')  # a ClassLabel's names, in its order


def test_instruction_labels_are_the_response_tokens_only(tmp_path, tokenizer):
    rows = instruction_examples(datasets.Dataset.from_list(PAIRS), tokenizer, max_seq_len=64).rows
    prompt_ids = tokenizer(PAIRS[3]['prompt'])['input_ids']
    ids, labels = rows[3]['input_ids'], rows[3]['labels']
    assert ids[: len(prompt_ids)] == prompt_ids
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    response = labels[len(prompt_ids) :]
    assert response == ids[len(prompt_ids) :] and IGNORE_INDEX not in response
    assert tokenizer.decode(response) == 'it is 6. [SEP]'  # the response, then the end of the text


def test_a_chat_template_renders_conversations_and_only_assistant_turns_are_learned(chat_tokenizer):
    messages = [
        {'role': 'user', 'content': 'hello there'},
        {'role': 'assistant', 'content': 'hi'},
        {'role': 'user', 'content': 'how are you'},
        {'role': 'assistant', 'content': 'very well'},
    ]
    table = datasets.Dataset.from_list([{'messages': messages}])
    row = instruction_examples(table, chat_tokenizer, messages_column='messages', max_seq_len=64).rows[0]
    assert row['input_ids'] == chat_tokenizer.apply_chat_template(messages, tokenize=True)
    learned = chat_tokenizer.decode([label for label in row['labels'] if label != IGNORE_INDEX])
    assert learned == 'hi very well'
    pairs = instruction_examples(datasets.Dataset.from_list(PAIRS[:1]), chat_tokenizer, max_seq_len=64).rows[0]
    assert chat_tokenizer.decode(pairs['input_ids']) == '[ user ] what is 0 plus 0? [ assistant ] it is 0.'
    assert chat_tokenizer.decode([t for t in pairs['labels'] if t != IGNORE_INDEX]) == 'it is 0.'


def test_packing_fills_every_block_and_unpacked_texts_keep_their_length(tokenizer):
    table = datasets.Dataset.from_dict({'text': [f'sentence {i} ' * (i + 1) for i in range(20)] + ['', '  ']})
    packed = causal_lm_examples(table, tokenizer, max_seq_len=16, packing=True).rows
    assert packed and all(len(row['input_ids']) == 16 and row['labels'] == row['input_ids'] for row in packed)
    unpacked = causal_lm_examples(table, tokenizer, max_seq_len=16).rows
    assert len(unpacked) == 20  # empty texts are skipped
    assert len(unpacked[0]['input_ids']) == len(tokenizer('sentence 0')['input_ids']) - 1  # no [CLS]; [SEP] ends it


def test_an_eval_fraction_is_a_seeded_split_of_the_training_rows(tmp_path, tokenizer):
    source = str(_jsonl(tmp_path / 'pairs.jsonl', PAIRS))
    first = load_task_data('instruction', tokenizer, source, eval_fraction=0.3, seed=3)
    again = load_task_data('instruction', tokenizer, source, eval_fraction=0.3, seed=3)
    assert (len(first.train), len(first.eval)) == (7, 3)
    assert [r['input_ids'] for r in first.eval.rows] == [r['input_ids'] for r in again.eval.rows]
    batch = next(iter(first.train_loader(batch_size=4)))
    assert (batch['labels'] == IGNORE_INDEX).any() and (batch['labels'] != IGNORE_INDEX).any()
    assert ((batch['attention_mask'] == 0) <= (batch['labels'] == IGNORE_INDEX)).all()  # padding is never learned


def _write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


def _dataset_dict(tmp_path: Path) -> str:
    rows = datasets.Dataset.from_dict({'text': ['a', 'b']})
    datasets.DatasetDict({'train': rows, 'test': rows}).save_to_disk(str(tmp_path / 'splits'))
    return str(tmp_path / 'splits')


def _plain_folder(tmp_path: Path) -> str:
    (tmp_path / 'folder').mkdir()
    return str(tmp_path / 'folder')


# name -> (task, build(tmp_path) -> (train, eval or None), options, error key, fragment of the message)
BAD_DATA = {
    'missing file': ('causal_lm', lambda p: (str(p / 'absent.jsonl'), None), {}, 'data.train', 'no such file'),
    'glob matching nothing': ('causal_lm', lambda p: (str(p / '*.jsonl'), None), {}, 'data.train', 'matches nothing'),
    'empty file': ('causal_lm', lambda p: (_write(p, 'e.jsonl', ''), None), {}, 'data.train', 'the file is empty'),
    'header only': (
        'classification',
        lambda p: (_write(p, 'h.csv', 'text,label\n'), None),
        {},
        'data.train',
        'no rows',
    ),
    'broken JSON': (
        'causal_lm',
        lambda p: (_write(p, 'b.jsonl', '{"text": \n'), None),
        {},
        'data.train',
        'not readable',
    ),
    'unknown extension': (
        'causal_lm',
        lambda p: (_write(p, 'x.xlsx', 'x'), None),
        {},
        'data.train',
        'unknown file type',
    ),
    'DatasetDict folder': ('causal_lm', lambda p: (_dataset_dict(p), None), {}, 'data.train', 'name one split folder'),
    'folder not from save_to_disk': ('causal_lm', lambda p: (_plain_folder(p), None), {}, 'data.train', 'save_to_disk'),
    'missing text column': (
        'classification',
        lambda p: (_write(p, 't.csv', 'sentence,label\na,x\nb,y\n'), None),
        {},
        'data.text_column',
        'its columns: sentence, label',
    ),
    'missing label column': (
        'classification',
        lambda p: (_write(p, 't.csv', REVIEWS), None),
        {'label_column': 'sentiment'},
        'data.label_column',
        'its columns: text, label',
    ),
    'unknown eval label': (
        'classification',
        lambda p: (_write(p, 't.csv', REVIEWS), _write(p, 'e.csv', 'text,label\nmeh,awful\n')),
        {},
        'data.label_column',
        "label 'awful', which the training data does not have; known labels: bad, fine, good",
    ),
    'a single label': (
        'classification',
        lambda p: (_write(p, 't.csv', 'text,label\na,x\nb,x\n'), None),
        {},
        'data.label_column',
        'needs two or more',
    ),
    'rows without a label': (
        'classification',
        lambda p: (_jsonl(p / 't.jsonl', [{'text': 'a', 'label': 'x'}, {'text': 'b', 'label': None}]), None),
        {},
        'data.label_column',
        'rows without a label',
    ),
    'a number as text': (  # datasets 4 reads the column and the check refuses it; datasets 3 refuses to read it
        'causal_lm',
        lambda p: (_jsonl(p / 't.jsonl', [{'text': 'a'}, {'text': 3}]), _jsonl(p / 'e.jsonl', [{'text': 'b'}])),
        {},
        ('data.text_column', 'data.train'),
        ('data.train row 1 holds 3, not a text', 'JSON parse error: Column(/text) changed from string to number'),
    ),
    'missing prompt column': (
        'instruction',
        lambda p: (_jsonl(p / 't.jsonl', [{'question': 'a', 'response': 'b'}] * 2), None),
        {},
        'data.prompt_column',
        'no such column',
    ),
    'chat data without messages_column': (
        'instruction',
        lambda p: (_jsonl(p / 't.jsonl', [{'messages': [{'role': 'user', 'content': 'a'}]}] * 2), None),
        {},
        'data.prompt_column',
        'set data.messages_column: messages',
    ),
    'messages without a chat template': (
        'instruction',
        lambda p: (_jsonl(p / 't.jsonl', [{'messages': [{'role': 'assistant', 'content': 'a'}]}] * 2), None),
        {'messages_column': 'messages'},
        'data.messages_column',
        'need a tokenizer with a chat template',
    ),
    'messages without an assistant turn': (
        'instruction',
        lambda p: (_jsonl(p / 't.jsonl', [{'messages': [{'role': 'user', 'content': 'a'}]}] * 2), None),
        {'messages_column': 'messages'},
        'data.messages_column',
        'row 0 has no assistant message',
    ),
    'too little text for one packed block': (
        'causal_lm',
        lambda p: (_jsonl(p / 't.jsonl', [{'text': 'short'}] * 2), None),
        {'packing': True, 'max_seq_len': 64},
        'data.packing',
        'fewer than one block',
    ),
    'prompts longer than max_seq_len': (
        'instruction',
        lambda p: (_jsonl(p / 't.jsonl', PAIRS), None),
        {'max_seq_len': 4},
        'data.max_seq_len',
        'cut before its response starts',
    ),
    'neither eval nor eval_fraction': (
        'causal_lm',
        lambda p: (_jsonl(p / 't.jsonl', [{'text': 'a'}] * 2), None),
        {'eval_fraction': None},
        'data.eval',
        'not neither',
    ),
    'an eval file that is empty': (
        'causal_lm',
        lambda p: (str(_jsonl(p / 't.jsonl', [{'text': 'a'}] * 2)), _write(p, 'e.jsonl', '')),
        {},
        'data.eval',
        'the file is empty',
    ),
    'unknown task': ('summarization', lambda p: ('x', None), {}, 'data.task', 'classification, causal_lm, instruction'),
}


@pytest.mark.parametrize('name', list(BAD_DATA))
def test_bad_data_is_one_error_naming_the_key_and_what_is_valid(name, tmp_path, chat_tokenizer, tokenizer):
    task, build, options, key, fragment = BAD_DATA[name]
    train, eval_ = build(tmp_path)
    if eval_ is None and 'eval_fraction' not in options:
        options = {**options, 'eval_fraction': 0.5}
    options = {k: v for k, v in options.items() if v is not None}
    with pytest.raises(ConfigError) as error:
        load_task_data(task, tokenizer, train, eval_, **options)
    # a pair of (key, fragment): either, as datasets' versions read the file differently
    expected = list(zip(key, fragment)) if isinstance(key, tuple) else [(key, fragment)]
    assert any(error.value.key == k and f in str(error.value) for k, f in expected), str(error.value)
    assert '\n' not in str(error.value)
