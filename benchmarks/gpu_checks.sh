#!/usr/bin/env bash
# The GPU cases and CUDA-memory checks, for the lent GPU machine (the `device` tool), in about 10 minutes.
#
#   make gpu-wheels                 # here, with the network: the wheels that machine lacks, into build/gpu-wheels
#   bash benchmarks/gpu_checks.sh   # there (carry build/gpu-wheels): installs them --no-deps, runs the checks
#
# That machine has Python 3.12, a newer torch, transformers and peft, and no network: Composer 0.32.1 and its small
# dependencies go in without their pins (--no-deps --ignore-requires-python); our package is put on PYTHONPATH as
# composer_thaw (build/import), as `make lint` does. Runs every test that needs CUDA (the conformance suite's GPU
# cases: bf16 and FSDP2 on one GPU; the 1.1B master-weights peak against the estimate) and writes pytest's report
# and JUnit XML to $OUT (or build/gpu-results).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-build/gpu-results}"
mkdir -p "$out" build/import
python -m pip install --quiet --no-deps --ignore-requires-python build/gpu-wheels/*.whl
ln -sfn ../../algorithms build/import/composer_thaw
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -c 'import torch, transformers, composer; print(torch.__version__, transformers.__version__, composer.__version__)' \
    | tee -a "$out/gpu.txt"
export PYTHONPATH="$PWD/build/import:$PWD/tests:$PWD" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout 480 python -m pytest -q -p no:cacheprovider -o addopts= -rA --junitxml="$out/junit.xml" \
    tests/conformance/test_gpu.py \
    tests/test_master_weights.py::test_gpu_peak_of_a_1b_model_is_the_estimate_plus_activations \
    2>&1 | tee "$out/pytest.txt"
# The scale sweep (make bench-scale) as far as it fits, one round per size, every row at every size: bytes counted
# from the tensors and torch.cuda.memory_allocated growth after each step against `thaw estimate`, the peak
# (torch.cuda.max_memory_allocated growth) beside the estimator's peak; step time against each peer. Informative: it
# never fails the script. Tables, JSON and plots in $out/scale (scale.md).
timeout 300 python -m benchmarks.scale --device gpu --rounds 1 --fresh --output-dir "$out/scale" \
    > "$out/scale.txt" 2>&1 || echo "scale sweep stopped early (exit $?): the report has what finished" | tee -a "$out/scale.txt"
python -m benchmarks.scale --device gpu --report-only --output-dir "$out/scale" >> "$out/scale.txt" 2>&1 || true
tail -n 60 "$out/scale.txt"
