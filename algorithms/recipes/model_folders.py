"""What a local Hugging Face checkpoint folder holds, read from its files alone (no torch, no transformers): the
checks ``thaw run`` makes on ``model.path`` and ``model.tokenizer`` before anything heavy loads, so a wrong folder
is refused in about a second with one line naming it.

Example:
    >>> from composer_thaw.models.builtin import tiny_decoder
    >>> lm = tiny_decoder(num_layers=1)
    >>> lm.model.save_pretrained('runs/export')
    >>> positions_of(check_checkpoint_folder('model.path', 'runs/export'))  # its config's max_position_embeddings
    128
    >>> check_tokenizer_folder('model.tokenizer', 'runs/export')  # ConfigError naming what is missing
    Traceback (most recent call last):
    ConfigError: model.tokenizer = 'runs/export': no tokenizer loads from there: none of ... is in it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any, Optional, Union

from composer_thaw.core.validation import ConfigError

__all__ = [
    'TOKENIZER_FILES',
    'TOKENIZER_JSON_FILES',
    'WEIGHT_FILES',
    'check_checkpoint_folder',
    'check_tokenizer_folder',
    'has_chat_template',
    'positions_of',
]

# The files transformers reads weights from (a sharded checkpoint through its index).
WEIGHT_FILES = (
    'model.safetensors',
    'model.safetensors.index.json',
    'pytorch_model.bin',
    'pytorch_model.bin.index.json',
)
# A tokenizer loads from any of these (fast tokenizers, WordPiece, BPE and SentencePiece vocabularies).
TOKENIZER_FILES = (
    'tokenizer.json',
    'tokenizer_config.json',
    'vocab.txt',
    'vocab.json',
    'spiece.model',
    'tokenizer.model',
    'sentencepiece.bpe.model',
)

# The tokenizer's settings that are JSON (each read when present).
TOKENIZER_JSON_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.json')

NOT_LOADABLE = 'not a loadable Hugging Face checkpoint'


def _config(folder: Path, key: str) -> dict[str, Any]:
    path = folder / 'config.json'
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(key, str(folder), f'{NOT_LOADABLE}: config.json is not readable JSON ({error}).') from error
    if not isinstance(config, dict):
        raise ConfigError(key, str(folder), f'{NOT_LOADABLE}: config.json holds no mapping of settings.')
    return config


def _safetensors_problem(path: Path) -> Optional[str]:
    """Why ``path`` is not a whole safetensors file (its header says where its last tensor ends), or ``None``."""
    size = path.stat().st_size
    with path.open('rb') as file:
        head = file.read(8)
        if len(head) < 8:
            return f'{path.name} is cut short ({size} bytes)'
        (length,) = struct.unpack('<Q', head)
        if length > size - 8:
            return f'{path.name} is cut short or not a safetensors file (its header claims {length} bytes)'
        try:
            header = json.loads(file.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return f'{path.name} is not a safetensors file (its header is not JSON)'
    ends = [
        entry['data_offsets'][1]
        for name, entry in header.items()
        if name != '__metadata__' and isinstance(entry, dict) and 'data_offsets' in entry
    ]
    if ends and 8 + length + max(ends) > size:
        return f'{path.name} is cut short ({size} bytes; its tensors end at byte {8 + length + max(ends)})'
    return None


def check_checkpoint_folder(key: str, folder: Union[str, Path]) -> dict[str, Any]:
    """Raise :class:`ConfigError` naming ``key`` unless ``folder`` holds a readable ``config.json`` and weights
    (a whole ``model.safetensors`` when that is what it has); return the config's settings."""
    folder = Path(folder)
    config = _config(folder, key)
    present = [name for name in WEIGHT_FILES if (folder / name).is_file()]
    if not present:
        raise ConfigError(
            key, str(folder), f'{NOT_LOADABLE}: no weights there (expected one of {", ".join(WEIGHT_FILES)}).'
        )
    if present[0] == 'model.safetensors':
        problem = _safetensors_problem(folder / 'model.safetensors')
        if problem is not None:
            raise ConfigError(key, str(folder), f'{NOT_LOADABLE}: {problem}.')
    return config


def check_tokenizer_folder(key: str, folder: Union[str, Path]) -> None:
    """Raise :class:`ConfigError` naming ``key`` unless ``folder`` holds a tokenizer's files, its JSON ones readable
    (the ``tokenizers`` library reports a broken ``tokenizer.json`` with a bare ``Exception``)."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(
            key, str(folder), f'no tokenizer loads from there: none of {", ".join(TOKENIZER_FILES)} is in it.'
        )
    for name in TOKENIZER_JSON_FILES:
        path = folder / name
        if not path.is_file():
            continue
        try:
            json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ConfigError(
                key, str(folder), f'no tokenizer loads from there: {name} is not readable JSON ({error}).'
            ) from error


def positions_of(config: dict[str, Any]) -> Optional[int]:
    """The number of positions a model of this ``config.json`` takes, when it says (``None`` otherwise)."""
    for name in ('max_position_embeddings', 'n_positions', 'max_seq_len'):
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def has_chat_template(folder: Union[str, Path]) -> bool:
    """Whether the tokenizer in ``folder`` has a chat template (in ``tokenizer_config.json`` or its own file)."""
    folder = Path(folder)
    if (folder / 'chat_template.jinja').is_file() or (folder / 'chat_template.json').is_file():
        return True
    try:
        settings = json.loads((folder / 'tokenizer_config.json').read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(settings, dict) and bool(settings.get('chat_template'))
