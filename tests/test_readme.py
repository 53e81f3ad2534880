"""The README's Python example runs as written (on a shortened duration)."""

import re

from support import REPO


def _python_examples() -> list[str]:
    return re.findall(r'```python\n(.*?)```', (REPO / 'README.md').read_text(), flags=re.S)


def test_readme_python_example_trains():
    (example,) = [e for e in _python_examples() if 'minilm_classifier' in e]
    assert 'LoRAInject' in example and 'Trainer(' in example
    shortened = example.replace("max_duration='2ep'", "max_duration='2ba'")
    assert shortened != example
    namespace: dict = {}
    exec(compile(shortened, 'README.md', 'exec'), namespace)
    assert int(namespace['trainer'].state.timestamp.batch) == 2


def test_readme_own_data_example_trains_a_local_folder(tmp_path, monkeypatch):
    from support import seeded_tiny_decoder

    (example,) = [e for e in _python_examples() if 'load_task_data' in e]
    decoder = seeded_tiny_decoder(num_layers=1, hidden_size=16)
    decoder.model.save_pretrained(tmp_path / 'my-decoder')
    decoder.tokenizer.save_pretrained(tmp_path / 'my-decoder')
    monkeypatch.chdir(REPO)  # the example's data path is relative to the repository
    shortened = example.replace("'my-decoder'", repr(str(tmp_path / 'my-decoder'))).replace("'1ep'", "'2ba'")
    assert shortened.count(str(tmp_path)) == 2
    namespace: dict = {}
    exec(compile(shortened, 'README.md', 'exec'), namespace)
    assert int(namespace['trainer'].state.timestamp.batch) == 2
    data = namespace['data']
    assert data.label_names is None and (len(data.train), len(data.eval)) == (63, 8)  # 71 pairs, 10% held out
