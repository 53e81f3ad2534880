"""The README's Python example runs as written (on a shortened duration)."""

import re

from support import REPO


def test_readme_python_example_trains():
    text = (REPO / 'README.md').read_text()
    (example,) = re.findall(r'```python\n(.*?)```', text, flags=re.S)
    assert 'LoRAInject' in example and 'Trainer(' in example
    shortened = example.replace("max_duration='2ep'", "max_duration='2ba'")
    assert shortened != example
    namespace: dict = {}
    exec(compile(shortened, 'README.md', 'exec'), namespace)
    assert int(namespace['trainer'].state.timestamp.batch) == 2
