"""The benchmark runner works end to end on a minimal configuration, peers included, and writes its reports."""

from __future__ import annotations

import json
import sys

import support

sys.path.insert(0, str(support.REPO))  # the benchmarks package lives at the repository root

from benchmarks import report, run
from benchmarks.methods import METHODS, Method


def test_minimal_run_measures_every_method_and_writes_table_json_and_plots(tmp_path, monkeypatch):
    missing = Method(
        'missing_peer',
        'a peer that is not installed',
        'peer',
        lambda task, device: None,
        requires=('no_such_package_xyz',),
    )
    monkeypatch.setattr(run, 'METHODS', (*METHODS, missing))

    result = run.run(
        quick=True,
        repeats=2,
        batches=2,
        tasks=['decoder-s'],
        rss_check=False,
        log=lambda *_: None,
        methods=['full', 'lora_inject', 'peft_lora', 'hift_package', 'badam', 'missing_peer'],
    )
    paths = report.write(result, tmp_path)

    rows = {row['method']: row for row in result['tasks'][0]['rows']}
    assert set(rows) == {'full', 'lora_inject', 'peft_lora', 'hift_package', 'badam', 'missing_peer'}
    assert rows['missing_peer'] == {
        **rows['missing_peer'],
        'available': False,
        'reason': 'no_such_package_xyz is not installed',
    }
    for key in ('full', 'lora_inject', 'peft_lora', 'hift_package', 'badam'):
        row = rows[key]
        assert row['repeats'] == 2 and len(row['losses']) == 2 and row['step_seconds']['median'] > 0
        assert row['peak_memory_growth']['median'] > 0 and row['eval_metric'] > 0
    full_state = sum(rows['full']['peak_state'].values())
    assert rows['lora_inject']['vs_full']['state_bytes'] == sum(rows['lora_inject']['peak_state'].values()) / full_state
    assert rows['lora_inject']['vs_peer']['state_bytes'] <= 1.0  # no more than PEFT holds
    assert all(abs(e['relative_error']) < 1e-9 for e in result['tasks'][0]['estimator'])

    table = (tmp_path / 'latest.md').read_text()
    assert '| ours: LoRAInject r=8 (peer: peft_lora) |' in table
    assert 'not run: no_such_package_xyz is not installed' in table
    assert json.loads((tmp_path / 'latest.json').read_text())['tasks'][0]['key'] == 'decoder-s'
    assert {p.name for p in paths} >= {'memory.png', 'loss.png', 'latest.json', 'latest.md'}
    assert (tmp_path / 'memory.png').read_bytes()[:4] == b'\x89PNG'


def test_bf16_products_in_fp32_are_fp32_sums_rounded_to_bf16_and_only_inside_the_mode():
    """The quality benchmark's bf16 runs: each product of bf16 tensors is the fp32 product of the same (exact) bf16
    values, rounded to bf16, in the forward and the backward pass; other dtypes and code outside are untouched."""
    import torch
    import torch.nn.functional as F

    from benchmarks.bf16_matmul import Bf16ProductsInFp32

    torch.manual_seed(0)
    x = torch.randn(4, 8, 16, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(32, 16, dtype=torch.bfloat16, requires_grad=True)
    bias = torch.randn(32, dtype=torch.bfloat16)
    with Bf16ProductsInFp32():
        out = F.linear(x, weight, bias)
        scores = x @ x.transpose(1, 2)
        attention = F.scaled_dot_product_attention(x, x, x)
        fp32_out = F.linear(x.float(), weight.float())  # not bf16: left alone
    assert out.dtype == scores.dtype == attention.dtype == torch.bfloat16 and fp32_out.dtype == torch.float32
    assert torch.equal(out, F.linear(x.float(), weight.float(), bias.float()).to(torch.bfloat16))
    assert torch.equal(scores, (x.float() @ x.float().transpose(1, 2)).to(torch.bfloat16))
    assert torch.equal(attention, F.scaled_dot_product_attention(x.float(), x.float(), x.float()).to(torch.bfloat16))

    out.float().sum().backward()
    assert weight.grad is not None and weight.grad.dtype == torch.bfloat16
    expected = (torch.ones(4 * 8, 32).T @ x.detach().float().reshape(-1, 16)).to(torch.bfloat16)
    assert torch.equal(weight.grad, expected)
