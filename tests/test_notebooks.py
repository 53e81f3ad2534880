"""The notebooks run top to bottom, offline, on this venv's Python (each takes well under a minute on 2 cores; how
long is not asserted, a test on a busy machine would only be flaky)."""

from __future__ import annotations

import sys

import nbformat
import pytest
import support
from nbclient import NotebookClient

NOTEBOOKS = support.REPO / 'notebooks'


def _execute(name: str) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    notebook.cells.insert(0, nbformat.v4.new_code_cell('import sys; print(sys.executable)'))
    client = NotebookClient(
        notebook,
        kernel_name='python3',
        timeout=600,  # per cell: a hung kernel fails the test
        allow_errors=False,
        resources={'metadata': {'path': str(NOTEBOOKS)}},
    )
    client.execute(
        env={
            'HF_HUB_OFFLINE': '1',
            'TRANSFORMERS_OFFLINE': '1',
            'OMP_NUM_THREADS': '1',
            'PYTHONWARNINGS': 'ignore',
            'PYTHONPATH': str(support.REPO),
        }
    )
    return notebook


def _text(cell) -> str:
    return ''.join(output.get('text', '') for output in cell.get('outputs', []))


@pytest.mark.parametrize('name', ['quickstart.ipynb', 'comparison.ipynb'])
def test_notebook_runs_offline_on_this_venv(name):
    notebook = _execute(name)

    assert _text(notebook.cells[0]).strip() == sys.executable  # the kernel is this venv's Python
    if name == 'quickstart.ipynb':
        assert 'LoRAInject' in _text(notebook.cells[-1]) and 'llama-7b' in _text(notebook.cells[-1])
    else:
        assert any(
            output.get('output_type') == 'display_data' and 'image/png' in output.get('data', {})
            for cell in notebook.cells
            for output in cell.get('outputs', [])
        )
