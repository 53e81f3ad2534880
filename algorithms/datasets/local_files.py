"""Your own data from local files, read with Hugging Face ``datasets``: the ``data: {name: files}`` of a recipe.

A source is a JSON Lines / JSON, CSV, Parquet or text file (a glob, or a list of them), or a folder written by
``Dataset.save_to_disk``. Three tasks turn its rows into token ids ready for Composer:

* ``classification``: a text column and a label column. The label set comes from the training rows (its
  ``ClassLabel`` names when it has them, else the sorted distinct values); an eval label never seen in training
  is an error, not a silently wrong accuracy.
* ``causal_lm``: a text column; each text is cut to ``max_seq_len`` tokens, or, with ``packing``, all texts are
  joined (an end-of-text token between them) and cut into blocks of exactly ``max_seq_len`` tokens.
* ``instruction``: prompt and response columns, or a column of chat ``messages`` (``[{role, content}, ...]``);
  rendered with the tokenizer's chat template when it has one. The loss is on the response (assistant) tokens
  only: every other label is ``-100``.

Every problem with the data (a missing file, an empty one, a column that is not there, a label that only the
eval data has, rows of the wrong shape) is a :class:`~composer_thaw.core.validation.ConfigError` naming the
recipe key, its value and what would be valid, raised before any model is built. The functions here are what
``thaw run`` uses; call them from Python to train your own data with your own ``Trainer``.

Example:
    >>> import json, pathlib
    >>> from composer_thaw.datasets.local_files import load_task_data
    >>> from composer_thaw.models.builtin import load_tokenizer
    >>> rows = [{'prompt': f'What is {i} + {i}?', 'response': f'{i} + {i} is {2 * i}.'} for i in range(10)]
    >>> _ = pathlib.Path('train.jsonl').write_text(''.join(json.dumps(row) + '\\n' for row in rows))
    >>> data = load_task_data('instruction', load_tokenizer(), train='train.jsonl', eval_fraction=0.2, max_seq_len=64)
    >>> len(data.train), len(data.eval)
    (8, 2)
    >>> batch = next(iter(data.train_loader(batch_size=4)))  # padded: labels -100 outside the responses
    >>> sorted(batch)
    ['attention_mask', 'input_ids', 'labels']
    >>> data.label_names is None  # only classification has labels
    True

Why one module: every file format goes through the same column, label, position and tokenizer checks before a
row is tokenized; reading and checking are one pipeline, and a split would make each half import the other.
"""

from __future__ import annotations

import glob
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Optional, Union

from composer_thaw.core.validation import ConfigError

if TYPE_CHECKING:
    import datasets
    from torch.utils.data import DataLoader

__all__ = [
    'DATA_FORMATS',
    'DATA_TASKS',
    'NO_CHAT_TEMPLATE',
    'DataFormat',
    'DataTask',
    'TaskData',
    'TokenizedExamples',
    'causal_lm_examples',
    'check_task_rows',
    'classification_examples',
    'collator_for',
    'instruction_examples',
    'label_names_of',
    'load_table',
    'load_task_data',
    'source_format',
]

NO_CHAT_TEMPLATE = (
    'chat messages need a tokenizer with a chat template (chat_template in its tokenizer_config.json); this one has '
    'none. Give model.tokenizer one that has, or use prompt/response columns.'
)

DataTask = Literal['classification', 'causal_lm', 'instruction']
DATA_TASKS: tuple[DataTask, ...] = ('classification', 'causal_lm', 'instruction')
DataFormat = Literal['json', 'csv', 'parquet', 'text', 'disk']
DATA_FORMATS: tuple[DataFormat, ...] = ('json', 'csv', 'parquet', 'text', 'disk')
_EXTENSIONS: dict[str, DataFormat] = {
    '.jsonl': 'json',
    '.json': 'json',
    '.csv': 'csv',
    '.parquet': 'parquet',
    '.txt': 'text',
    '.text': 'text',
}
_COMPRESSIONS = ('.gz', '.bz2', '.xz', '.zst')  # read through by datasets: rows.jsonl.gz is json
IGNORE_INDEX = -100  # the label of a token the loss skips (PyTorch's and Hugging Face's convention)

Source = Union[str, Path, Sequence[Union[str, Path]]]


def _files(key: str, source: Source) -> list[Path]:
    """The paths ``source`` names (globs expanded), each existing; raise naming ``key`` otherwise."""
    entries = [source] if isinstance(source, (str, Path)) else list(source)
    if not entries:
        raise ConfigError(key, [], 'expected a file, a glob, a save_to_disk folder, or a list of files.')
    paths: list[Path] = []
    for entry in entries:
        text = str(entry)
        matches = sorted(glob.glob(text)) if glob.has_magic(text) else [text]
        if not matches or not Path(matches[0]).exists():
            raise ConfigError(
                key, text, 'no such file or folder' + (' (the glob matches nothing).' if matches == [] else '.')
            )
        paths += [Path(m) for m in matches]
    return paths


def _extension(path: Path) -> str:
    """The extension that names the format: ``.jsonl`` for ``rows.jsonl`` and ``rows.jsonl.gz``."""
    name = path.name.lower()
    for compression in _COMPRESSIONS:
        name = name.removesuffix(compression)
    return Path(name).suffix


def source_format(key: str, source: Source, data_format: Optional[str] = None) -> DataFormat:
    """The format of ``source``: ``data_format`` when given, else from the file extension (``.jsonl`` -> json),
    or ``disk`` for a ``save_to_disk`` folder. Raises :class:`ConfigError` for a missing path, a folder that
    ``save_to_disk`` did not write, an unknown extension or files of mixed formats.

    Example:
        >>> _ = open('train.jsonl', 'w').write('{"text": "a row"}\\n')
        >>> source_format('data.train', 'train.jsonl')
        'json'
        >>> source_format('data.train', 'missing.jsonl')
        Traceback (most recent call last):
        ConfigError: data.train = 'missing.jsonl': ...
    """
    paths = _files(key, source)
    if any(p.is_dir() for p in paths):
        if len(paths) > 1:
            raise ConfigError(
                key, [str(p) for p in paths], 'a save_to_disk folder is a source on its own, not in a list.'
            )
        folder = paths[0]
        if (folder / 'dataset_dict.json').is_file():
            splits = sorted(p.name for p in folder.iterdir() if p.is_dir())
            raise ConfigError(
                key,
                str(folder),
                f'a DatasetDict folder with splits {", ".join(splits)}; name one split folder, '
                f'e.g. {str(folder / (splits[0] if splits else "train"))!r}.',
            )
        if not (folder / 'state.json').is_file():
            raise ConfigError(
                key, str(folder), 'a folder, but not one written by Dataset.save_to_disk (it has no state.json).'
            )
        return 'disk'
    if data_format is not None:
        if data_format not in DATA_FORMATS or data_format == 'disk':
            raise ConfigError('data.format', data_format, f'choose one of {", ".join(DATA_FORMATS[:-1])} (or null).')
        return data_format
    formats = {_EXTENSIONS.get(_extension(p)) for p in paths}
    if None in formats:
        unknown = next(str(p) for p in paths if _extension(p) not in _EXTENSIONS)
        raise ConfigError(
            key,
            unknown,
            f'unknown file type; use one of {", ".join(_EXTENSIONS)}, a save_to_disk folder, or set data.format.',
        )
    if len(formats) > 1:
        raise ConfigError(key, [str(p) for p in paths], 'files of different formats; use one format per source.')
    return formats.pop()  # type: ignore[return-value]  # None was excluded


def load_table(key: str, source: Source, data_format: Optional[str] = None) -> datasets.Dataset:
    """Read ``source`` (see :func:`source_format`) into a :class:`datasets.Dataset`; raise :class:`ConfigError`
    naming ``key`` when it is missing, empty or unreadable.

    Example:
        >>> _ = open('reviews.csv', 'w').write('text,label\\ngreat,pos\\nawful,neg\\n')
        >>> table = load_table('data.train', 'reviews.csv')
        >>> table.column_names, len(table)
        (['text', 'label'], 2)
    """
    import datasets

    fmt = source_format(key, source, data_format)
    paths = _files(key, source)
    for path in paths:
        if path.is_file() and path.stat().st_size == 0:
            raise ConfigError(key, str(path), 'the file is empty.')
    shown: Any = str(paths[0]) if len(paths) == 1 else [str(p) for p in paths]
    progress = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its parsers log what our one line says already
    try:
        if fmt == 'disk':
            table = datasets.load_from_disk(str(paths[0]))
        else:
            table = datasets.load_dataset(fmt, data_files=[str(p) for p in paths], split='train')
    except Exception as error:  # datasets wraps parser errors in its own classes; the first line says what broke
        cause = error.__cause__ or error
        detail = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        if 'corresponds to no data' in detail:  # a CSV with its header only
            raise ConfigError(key, shown, 'no rows.') from error
        raise ConfigError(key, shown, f'not readable as {fmt}: {detail}') from error
    finally:
        datasets.logging.set_verbosity(verbosity)
        if progress:
            datasets.enable_progress_bars()
    if not isinstance(table, datasets.Dataset):
        raise ConfigError(key, shown, 'expected one split of rows (a Dataset), not a DatasetDict.')
    if len(table) == 0:
        raise ConfigError(key, shown, 'no rows.')
    return table


def _require_column(key: str, column: str, table: datasets.Dataset, source_key: str) -> None:
    if column not in table.column_names:
        raise ConfigError(key, column, f'no such column in {source_key}; its columns: {", ".join(table.column_names)}.')


def _strings(key: str, column: str, table: datasets.Dataset, source_key: str) -> list[str]:
    values = list(table[column])
    for row, value in enumerate(values):
        if not isinstance(value, str):
            raise ConfigError(key, column, f'{source_key} row {row} holds {value!r}, not a text.')
    return values


def label_names_of(table: datasets.Dataset, label_column: str, source_key: str = 'data.train') -> tuple[str, ...]:
    """The classes of ``table``'s ``label_column``: a ``ClassLabel`` column's names, else its distinct values sorted
    (numbers numerically), as strings. Raises :class:`ConfigError` for a missing column, an empty label or fewer
    than two classes.

    Example:
        >>> import datasets
        >>> label_names_of(datasets.Dataset.from_dict({'label': ['pos', 'neg', 'pos']}), 'label')
        ('neg', 'pos')
    """
    import datasets

    key = 'data.label_column'
    _require_column(key, label_column, table, source_key)
    feature = table.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        names = tuple(feature.names)
    else:
        values = set(table[label_column])
        if None in values or '' in values:
            raise ConfigError(key, label_column, f'{source_key} has rows without a label.')
        kinds = {type(v) for v in values}
        if not (kinds <= {str} or kinds <= {int, bool}):
            raise ConfigError(
                key,
                label_column,
                f'{source_key} labels must be all texts or all integers, not {sorted(map(str, values))[:6]}.',
            )
        names = tuple(str(v) for v in sorted(values))
    if len(names) < 2:
        raise ConfigError(
            key, label_column, f'{source_key} has only the label {list(names)}; a classifier needs two or more.'
        )
    return names


def check_task_rows(
    task: str,
    table: datasets.Dataset,
    *,
    text_column: str = 'text',
    label_column: str = 'label',
    prompt_column: str = 'prompt',
    response_column: str = 'response',
    messages_column: Optional[str] = None,
    label_names: Optional[Sequence[str]] = None,
    source_key: str = 'data.train',
) -> Optional[tuple[str, ...]]:
    """Check the rows of ``table`` for ``task`` without a tokenizer: the columns exist and hold texts, labels or chat
    messages (what ``thaw run`` checks as soon as it has read a file, before Composer or transformers load).

    Returns a classification table's label names: its own, or, given ``label_names`` (the training data's), those,
    after checking that every label is one of them. ``None`` for the other tasks.

    Example:
        >>> import datasets
        >>> check_task_rows('classification', datasets.Dataset.from_dict({'text': ['a', 'b'], 'label': [0, 1]}))
        ('0', '1')
        >>> check_task_rows('classification', datasets.Dataset.from_dict({'text': ['a', 'b']}))
        Traceback (most recent call last):
        ConfigError: data.label_column = 'label': ...
    """
    if task == 'classification':
        _require_column('data.text_column', text_column, table, source_key)
        _strings('data.text_column', text_column, table, source_key)
        if label_names is None:
            return label_names_of(table, label_column, source_key)
        _label_indices(table, label_column, label_names, source_key)
        return tuple(label_names)
    if task == 'causal_lm':
        _require_column('data.text_column', text_column, table, source_key)
        if not any(text.strip() for text in _strings('data.text_column', text_column, table, source_key)):
            raise ConfigError('data.text_column', text_column, f'every text in {source_key} is empty.')
        return None
    if messages_column is not None:
        _require_column('data.messages_column', messages_column, table, source_key)
        for row, value in enumerate(list(table[messages_column])):
            _conversation('data.messages_column', value, row, source_key)
        return None
    for key, column in (('data.prompt_column', prompt_column), ('data.response_column', response_column)):
        if column not in table.column_names and 'messages' in table.column_names:
            raise ConfigError(
                key,
                column,
                f'no such column in {source_key}, which has chat messages: set data.messages_column: messages.',
            )
        _require_column(key, column, table, source_key)
        _strings(key, column, table, source_key)
    return None


def _label_indices(
    table: datasets.Dataset, label_column: str, label_names: Sequence[str], source_key: str
) -> list[int]:
    """Each row's label as its index in ``label_names``; an unknown label is a :class:`ConfigError`."""
    import datasets

    _require_column('data.label_column', label_column, table, source_key)
    feature = table.features[label_column]
    raw = list(table[label_column])
    if isinstance(feature, datasets.ClassLabel):
        raw = [feature.int2str(v) for v in raw]
    index = {name: i for i, name in enumerate(label_names)}
    labels = []
    for row, value in enumerate(raw):
        label = index.get(str(value))
        if label is None:
            raise ConfigError(
                'data.label_column',
                label_column,
                f'{source_key} row {row} has the label {value!r}, which the training data does not have; '
                f'known labels: {", ".join(label_names)}.',
            )
        labels.append(label)
    return labels


@dataclass
class TokenizedExamples:
    """A map-style data set of tokenized rows (dicts of ``input_ids``, ``attention_mask``, ``labels``)."""

    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


def classification_examples(
    table: datasets.Dataset,
    tokenizer: Any,
    label_names: Sequence[str],
    *,
    text_column: str = 'text',
    label_column: str = 'label',
    max_seq_len: int = 128,
    source_key: str = 'data.train',
) -> TokenizedExamples:
    """Texts tokenized (truncated to ``max_seq_len``) with their label's index in ``label_names``.

    Raises :class:`ConfigError` for a missing column, a non-text row, or a label not in ``label_names`` (an eval
    label the training data never had).

    Example:
        >>> import datasets
        >>> from composer_thaw.models.builtin import load_tokenizer
        >>> table = datasets.Dataset.from_dict({'text': ['great', 'awful'], 'label': ['pos', 'neg']})
        >>> rows = classification_examples(table, load_tokenizer(), ('neg', 'pos'), max_seq_len=64)
        >>> rows[0]
        {'input_ids': [101, 2307, 102], 'attention_mask': [1, 1, 1], 'labels': 1}
    """
    _require_column('data.text_column', text_column, table, source_key)
    texts = _strings('data.text_column', text_column, table, source_key)
    labels = _label_indices(table, label_column, label_names, source_key)  # an unknown label is refused here
    encoded = tokenizer(texts, truncation=True, max_length=max_seq_len)
    return TokenizedExamples(
        [
            {'input_ids': ids, 'attention_mask': mask, 'labels': label}
            for ids, mask, label in zip(encoded['input_ids'], encoded['attention_mask'], labels)
        ]
    )


def _end_of_text(tokenizer: Any) -> list[int]:
    token = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    return [] if token is None else [token]


def causal_lm_examples(
    table: datasets.Dataset,
    tokenizer: Any,
    *,
    text_column: str = 'text',
    max_seq_len: int = 128,
    packing: bool = False,
    source_key: str = 'data.train',
) -> TokenizedExamples:
    """Texts as language-modelling examples (labels = inputs), each followed by the end-of-text token.

    Without ``packing`` each non-empty text is one example, cut to ``max_seq_len`` tokens. With it, the texts are
    joined and cut into blocks of exactly ``max_seq_len`` tokens (the remainder is dropped), so no batch holds
    padding.

    Example:
        >>> import datasets
        >>> from composer_thaw.models.builtin import load_tokenizer
        >>> table = datasets.Dataset.from_dict({'text': ['one two three', 'four five', 'six']})
        >>> [len(row['input_ids']) for row in causal_lm_examples(table, load_tokenizer())]  # each + end of text
        [4, 3, 2]
        >>> [len(row['input_ids']) for row in causal_lm_examples(table, load_tokenizer(), max_seq_len=4, packing=True)]
        [4, 4]
    """
    check_task_rows('causal_lm', table, text_column=text_column, source_key=source_key)
    texts = [text for text in table[text_column] if text.strip()]
    end = _end_of_text(tokenizer)
    ids = [row + end for row in tokenizer(texts, add_special_tokens=False, verbose=False)['input_ids']]
    if packing:
        joined = [token for row in ids for token in row]
        usable = len(joined) // max_seq_len * max_seq_len
        if usable == 0:
            raise ConfigError(
                'data.packing',
                True,
                f'{source_key} has {len(joined)} tokens, fewer than one block of data.max_seq_len={max_seq_len}; '
                'use a shorter max_seq_len, more text, or packing: false.',
            )
        ids = [joined[start : start + max_seq_len] for start in range(0, usable, max_seq_len)]
    else:
        ids = [row[:max_seq_len] for row in ids]
    return TokenizedExamples([{'input_ids': row, 'attention_mask': [1] * len(row), 'labels': list(row)} for row in ids])


def _conversation(key: str, value: Any, row: int, source_key: str) -> list[dict[str, str]]:
    """Check one row of chat messages: a list of ``{role, content}`` with at least one assistant turn."""
    valid = "a list of {role, content} messages with at least one 'assistant' turn"
    if not isinstance(value, list) or not value:
        raise ConfigError(key, value, f'{source_key} row {row}: expected {valid}.')
    for message in value:
        if not (isinstance(message, dict) and isinstance(message.get('role'), str)):
            raise ConfigError(key, value, f'{source_key} row {row}: expected {valid}.')
        if not isinstance(message.get('content'), str):
            raise ConfigError(key, value, f'{source_key} row {row}: a message without text content; expected {valid}.')
    if not any(m['role'] == 'assistant' for m in value):
        raise ConfigError(
            key, value, f'{source_key} row {row} has no assistant message to learn from; expected {valid}.'
        )
    return [{'role': m['role'], 'content': m['content']} for m in value]


def _render(tokenizer: Any, messages: list[dict[str, str]], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(ids['input_ids'] if isinstance(ids, dict) else ids)


def _chat_tokens(tokenizer: Any, messages: list[dict[str, str]], key: str) -> tuple[list[int], list[int]]:
    """Token ids of the whole conversation and their labels: the assistant turns' tokens, -100 elsewhere.

    A turn's tokens are those its rendering adds after the conversation up to it with the generation prompt.
    """
    ids = _render(tokenizer, messages, False)
    labels = [IGNORE_INDEX] * len(ids)
    for turn, message in enumerate(messages):
        if message['role'] != 'assistant':
            continue
        start = len(_render(tokenizer, messages[:turn], True)) if turn else 0
        through = _render(tokenizer, messages[: turn + 1], False)
        if ids[: len(through)] != through or start > len(through):
            raise ConfigError(
                key,
                'chat_template',
                "the tokenizer's chat template does not render a conversation's beginning as a prefix of the whole, "
                'so the response tokens cannot be found; use prompt/response columns without a template.',
            )
        labels[start : len(through)] = ids[start : len(through)]
    return ids, labels


def instruction_examples(
    table: datasets.Dataset,
    tokenizer: Any,
    *,
    prompt_column: str = 'prompt',
    response_column: str = 'response',
    messages_column: Optional[str] = None,
    max_seq_len: int = 128,
    source_key: str = 'data.train',
) -> TokenizedExamples:
    """Prompt/response pairs (or chat ``messages``) as causal-LM examples whose loss is on the response only.

    With a chat template (``tokenizer.chat_template``), a pair is the conversation ``[user: prompt, assistant:
    response]`` and the labels are the assistant turns' tokens. Without one, the example is the prompt tokenized
    as the tokenizer does by default (special tokens included), then the response and the end-of-text token;
    chat messages need a template. Labels are ``-100`` on every other token. Examples are cut to ``max_seq_len``;
    one left with no response token is dropped (with a warning).

    Example:
        >>> import datasets
        >>> from composer_thaw.models.builtin import load_tokenizer
        >>> table = datasets.Dataset.from_dict({'prompt': ['Two plus two?'], 'response': ['Four.']})
        >>> rows = instruction_examples(table, load_tokenizer(), max_seq_len=256)
        >>> sum(label != -100 for label in rows[0]['labels'])  # the response's tokens: 'four', '.', end of text
        3
    """
    check_task_rows(
        'instruction',
        table,
        prompt_column=prompt_column,
        response_column=response_column,
        messages_column=messages_column,
        source_key=source_key,
    )
    if messages_column is not None:
        conversations = [
            _conversation('data.messages_column', value, row, source_key)
            for row, value in enumerate(list(table[messages_column]))
        ]
        if getattr(tokenizer, 'chat_template', None) is None:
            raise ConfigError('data.messages_column', messages_column, NO_CHAT_TEMPLATE)
    else:
        prompts, responses = list(table[prompt_column]), list(table[response_column])
        conversations = [
            [{'role': 'user', 'content': p}, {'role': 'assistant', 'content': r}] for p, r in zip(prompts, responses)
        ]
    with_template = getattr(tokenizer, 'chat_template', None) is not None
    end = _end_of_text(tokenizer)
    rows = []
    for conversation in conversations:
        if with_template:
            ids, labels = _chat_tokens(tokenizer, conversation, 'model.tokenizer')
        else:
            prompt = tokenizer(conversation[0]['content'], verbose=False)['input_ids']
            response = tokenizer(conversation[1]['content'], add_special_tokens=False, verbose=False)['input_ids'] + end
            ids, labels = prompt + response, [IGNORE_INDEX] * len(prompt) + response
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if any(label != IGNORE_INDEX for label in labels):
            rows.append({'input_ids': ids, 'attention_mask': [1] * len(ids), 'labels': labels})
    dropped = len(conversations) - len(rows)
    if not rows:
        raise ConfigError(
            'data.max_seq_len',
            max_seq_len,
            f'every example of {source_key} is cut before its response starts; use a longer max_seq_len.',
        )
    if dropped:
        warnings.warn(
            f'{dropped} of {len(conversations)} examples of {source_key} have no response token within '
            f'data.max_seq_len={max_seq_len} and were left out.',
            UserWarning,
            stacklevel=2,
        )
    return TokenizedExamples(rows)


def collator_for(task: DataTask, tokenizer: Any) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
    """The batch collator of ``task``: padding to the longest example, with labels padded by ``-100`` for the
    language-modelling tasks (so padding never counts in the loss)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if task == 'classification':
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX)


@dataclass(frozen=True)
class TaskData:
    """Tokenized train and eval sets of one task, their collator, and the class names (classification only)."""

    task: DataTask
    train: TokenizedExamples
    eval: TokenizedExamples
    collate_fn: Callable[[list[dict[str, Any]]], dict[str, Any]]
    label_names: Optional[tuple[str, ...]] = None

    def train_loader(self, batch_size: int, drop_last: bool = True) -> DataLoader:
        """A shuffled loader over the training set with Composer's distributed sampler (``batch_size`` per process)."""
        return _loader(self.train, self.collate_fn, batch_size, shuffle=True, drop_last=drop_last)

    def eval_loader(self, batch_size: int) -> DataLoader:
        """A loader over the eval set, in order, every example once."""
        return _loader(self.eval, self.collate_fn, batch_size, shuffle=False, drop_last=False)

    @property
    def majority_rate(self) -> Optional[float]:
        """The share of the eval set's most frequent class: the accuracy of always guessing it."""
        if self.label_names is None or not len(self.eval):
            return None
        counts: dict[int, int] = {}
        for row in self.eval.rows:
            counts[row['labels']] = counts.get(row['labels'], 0) + 1
        return max(counts.values()) / len(self.eval)


def _loader(dataset: Any, collate_fn: Callable, batch_size: int, shuffle: bool, drop_last: bool) -> DataLoader:
    from composer.utils import dist
    from torch.utils.data import DataLoader

    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=dist.get_sampler(dataset, shuffle=shuffle, drop_last=drop_last),
        collate_fn=collate_fn,
        drop_last=drop_last,
    )


def load_task_data(
    task: str,
    tokenizer: Any,
    train: Source,
    eval: Optional[Source] = None,
    *,
    eval_fraction: Optional[float] = None,
    data_format: Optional[str] = None,
    max_seq_len: int = 128,
    text_column: str = 'text',
    label_column: str = 'label',
    prompt_column: str = 'prompt',
    response_column: str = 'response',
    messages_column: Optional[str] = None,
    packing: bool = False,
    max_train_samples: Optional[int] = None,
    max_eval_samples: Optional[int] = None,
    seed: int = 17,
) -> TaskData:
    """Load, check and tokenize a train and an eval source for ``task`` (what a recipe's ``data: {name: files}``
    does). Error keys are the recipe's (``data.train``, ``data.text_column``, ...).

    Args:
        task: ``'classification'``, ``'causal_lm'`` or ``'instruction'``.
        tokenizer: a Hugging Face tokenizer (with a pad token:
            :func:`composer_thaw.models.builtin.load_tokenizer` sets one).
        train: the training rows: a file, a glob, a list of files, or a ``save_to_disk`` folder.
        eval: the eval rows, in the same forms; or ``None`` with ``eval_fraction``.
        eval_fraction: the share of ``train`` held out for evaluation (a seeded split), when ``eval`` is ``None``.
        data_format: ``json``, ``csv``, ``parquet`` or ``text`` for files whose extension does not say.
        max_seq_len: tokens per example (per block, with ``packing``).
        text_column: the text column of ``classification`` and ``causal_lm`` rows.
        label_column: the label column of ``classification`` rows.
        prompt_column: the prompt column of ``instruction`` rows.
        response_column: the response column of ``instruction`` rows.
        messages_column: the column of chat messages of ``instruction`` rows (used instead of prompt/response).
        packing: ``causal_lm`` only: join texts and cut them into full blocks of ``max_seq_len``.
        max_train_samples: keep only the first training rows (after the split).
        max_eval_samples: keep only the first eval rows.
        seed: the seed of the ``eval_fraction`` split.

    Raises:
        ConfigError: a missing, empty or unreadable source, a missing column, a bad row, an unknown eval label.

    Example:
        >>> from composer_thaw.models.builtin import load_tokenizer
        >>> _ = open('train.csv', 'w').write('text,sentiment\\ngood,positive\\nbad,negative\\nfine,neutral\\n')
        >>> _ = open('eval.csv', 'w').write('text,sentiment\\nnice,positive\\n')
        >>> data = load_task_data('classification', load_tokenizer(), 'train.csv', 'eval.csv', label_column='sentiment')
        >>> data.label_names
        ('negative', 'neutral', 'positive')
        >>> data.eval[0]['labels']
        2
    """
    if task not in DATA_TASKS:
        raise ConfigError('data.task', task, f'choose one of {", ".join(DATA_TASKS)}.')
    if (eval is None) == (eval_fraction is None):
        raise ConfigError(
            'data.eval',
            eval,
            'give either an eval source (data.eval) or a share of the training rows (data.eval_fraction), not '
            + ('both.' if eval is not None else 'neither.'),
        )
    train_table = load_table('data.train', train, data_format)
    if eval_fraction is not None:
        if not 0 < eval_fraction < 1:
            raise ConfigError('data.eval_fraction', eval_fraction, 'expected a number between 0 and 1 (exclusive).')
        if len(train_table) < 2:
            raise ConfigError('data.eval_fraction', eval_fraction, 'data.train has one row; nothing is left to split.')
        split = train_table.train_test_split(test_size=eval_fraction, seed=seed, shuffle=True)
        train_table, eval_table = split['train'], split['test']
        train_key, eval_key = 'data.train (its training split)', 'data.train (its eval_fraction split)'
    else:
        assert eval is not None
        eval_table, train_key, eval_key = load_table('data.eval', eval, data_format), 'data.train', 'data.eval'
    if max_train_samples is not None:
        train_table = train_table.select(range(min(max_train_samples, len(train_table))))
    if max_eval_samples is not None:
        eval_table = eval_table.select(range(min(max_eval_samples, len(eval_table))))

    label_names = None
    if task == 'classification':
        label_names = check_task_rows(
            task, train_table, text_column=text_column, label_column=label_column, source_key=train_key
        )

        def tokenize(table: datasets.Dataset, key: str) -> TokenizedExamples:
            assert label_names is not None
            return classification_examples(
                table,
                tokenizer,
                label_names,
                text_column=text_column,
                label_column=label_column,
                max_seq_len=max_seq_len,
                source_key=key,
            )
    elif task == 'causal_lm':

        def tokenize(table: datasets.Dataset, key: str) -> TokenizedExamples:
            return causal_lm_examples(
                table, tokenizer, text_column=text_column, max_seq_len=max_seq_len, packing=packing, source_key=key
            )
    else:

        def tokenize(table: datasets.Dataset, key: str) -> TokenizedExamples:
            return instruction_examples(
                table,
                tokenizer,
                prompt_column=prompt_column,
                response_column=response_column,
                messages_column=messages_column,
                max_seq_len=max_seq_len,
                source_key=key,
            )

    return TaskData(
        task,
        tokenize(train_table, train_key),
        tokenize(eval_table, eval_key),
        collator_for(task, tokenizer),
        label_names,
    )
