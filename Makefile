# Two commands do all set-up on a fresh machine (README):
#   make demo   environment + extension + the main job on the embedded default
#   make test   environment + extension + the whole test suite
# Both are idempotent: the venv and the build are only redone when their inputs change.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0
EXT_STAMP := $(VENV)/.ext-built
ENV_STAMP := $(VENV)/.env-ready

.PHONY: demo test build bench clean

# The embedded default: the SFT reference, then Anchored Learning toward it (recipes/tiny_cpu.yaml).
# A second `make demo` resumes both runs from their last checkpoints and ends at once.
DEMO_SFT := runs/tiny_cpu_sft
demo: $(EXT_STAMP)
	$(PY) -m nemo_anchored sft --config recipes/tiny_cpu.yaml
	$(PY) -m nemo_anchored anchor --config recipes/tiny_cpu.yaml \
		model.base_checkpoint=$(DEMO_SFT)/base model.reference_checkpoint=$(DEMO_SFT)/final

test: $(EXT_STAMP)
	$(PY) -m pytest -q tests

build: $(EXT_STAMP)

bench: $(EXT_STAMP)
	$(PY) bench/bench_anchored_kl.py

# The venv sees the system's packages, so a torch that is already installed (GPU images ship
# their own CUDA build) is used as it is; otherwise the CPU wheel goes into the venv.
$(ENV_STAMP): setup.py requirements.txt
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# The extension, rebuilt when the C++/CUDA sources change (ninja recompiles only what changed).
$(EXT_STAMP): $(ENV_STAMP) setup.py $(wildcard csrc/*)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build nemo_anchored/_C*.so *.egg-info $(EXT_STAMP)
