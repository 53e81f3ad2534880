"""The scale benchmark (``make bench-scale``) on a toy size: runs saved as they finish, the estimator beside the
measured bytes, each of ours paired with its peer, and the reports written."""

from __future__ import annotations

import json
import sys

import support

sys.path.insert(0, str(support.REPO))  # the benchmarks package lives at the repository root

from benchmarks import scale


def test_a_toy_size_measures_bytes_against_the_estimate_and_steps_against_the_peer(tmp_path, monkeypatch):
    monkeypatch.setattr(scale, 'SIZES', {'toy': (32, 2, 1)})
    rows = ('lora_inject', 'peft_lora', 'regex_freeze+masters', 'lora_inject+masters', 'peft_lora+bf16')
    monkeypatch.setattr(scale, 'ROWS_AT', {'toy': rows})
    runs = tmp_path / 'scale-runs'
    runs.mkdir()
    path = runs / 'toy.jsonl'
    # a run whose process died: recorded as failed, not run again
    path.write_text(json.dumps({'event': 'start', 'row': 'regex_freeze+masters', 'round': 0, 'size': 'toy'}) + '\n')

    monkeypatch.setattr(scale, 'FRESH_PROCESS_AT', {'toy': ('peft_lora',)})  # as the heavy rows at 1B
    assert scale.run_size('toy', path, log=lambda *_: None), 'PEFT ran in the process LoRAInject had run in'
    assert not scale.run_size('toy', path, log=lambda *_: None)  # a fresh process: PEFT first, then the rest
    started = [json.loads(line)['row'] for line in path.read_text().splitlines() if '"start"' in line]
    assert started == ['regex_freeze+masters', 'lora_inject', 'peft_lora', 'lora_inject+masters', 'peft_lora+bf16']
    result = scale.write(['toy'], 1.0, tmp_path)

    measured = {row['row']: row for row in result['sizes'][0]['rows']}
    assert set(measured) == set(rows)
    rows = measured
    assert rows['regex_freeze+masters']['failed'] and 'step_seconds' not in rows['regex_freeze+masters']
    ours = rows['lora_inject']
    assert len(ours['step_times'][0]) == scale.BATCHES - 1 and ours['vs_peer']['n'] == scale.BATCHES - 1
    assert ours['vs_peer_cpu']['n'] == scale.BATCHES - 1 and ours['step_cpu_seconds']['median'] > 0
    assert ours['tensors_error'] == 0.0 and ours['estimate']['trainable_params'] == ours['trainable_params']
    assert ours['memory_growth']['median'] > ours['tensors'] * 0.9
    assert rows['lora_inject+masters']['peer_row'] == 'peft_lora+bf16'  # like with like: PEFT on the bf16 model
    table = (tmp_path / 'scale.md').read_text()
    assert '| ours: LoRAInject r=8 (peer: peft_lora) | fp32 |' in table and 'failed: its process died' in table
    assert (tmp_path / 'scale_bytes.png').read_bytes()[:4] == b'\x89PNG'
    assert (tmp_path / 'scale_step_time.png').exists()
