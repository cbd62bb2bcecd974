# Two commands do all set-up on a fresh machine (README):
#   make demo   environment + extension + the main job on the embedded default (the quick lab)
#   make test   environment + extension + the whole test suite
# Both are idempotent: the venv and the build are only redone when their inputs change.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
TORCH_CPU := torch==2.13.0
EXT_STAMP := $(VENV)/.ext-built
ENV_STAMP := $(VENV)/.env-ready

.PHONY: demo train-demo test test-fast test-real-model lint build bench clean

# The embedded default: the quick forgetting lab (DEMO in nemo_anchored/lab/settings.py: sft, low_sft,
# kl_sft, anchored logit/live over the quick lr grids, 2 seeds, from the committed p_base).
demo: $(EXT_STAMP)
	$(PY) -m nemo_anchored lab --demo --out runs/lab_demo

# The two training stages on the shipped tiny_cpu recipe: the SFT reference, then Anchored Learning
# toward it. Repeating it resumes both runs from their last checkpoints and ends at once.
DEMO_SFT := runs/tiny_cpu_sft
train-demo: $(EXT_STAMP)
	$(PY) -m nemo_anchored sft --config tiny_cpu
	$(PY) -m nemo_anchored anchor --config tiny_cpu \
		model.base_checkpoint=$(DEMO_SFT)/base model.reference_checkpoint=$(DEMO_SFT)/final

# Everything but the real-model lab's --smoke run (see test-real-model), on two pytest-xdist
# workers: run one at a time, the tests leave a third of 2 cores idle (single-threaded steps:
# process start-up, compilers, waits), and two workers take about 3/4 of the serial time.
test: lint $(EXT_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadgroup -m "not real_model" tests

# `nemo-anchored lab --smoke` (the real-model lab, small) end to end: five trainings of the
# 135M SmolLM2 on the CPU, too heavy for the suite's budget (7 min 15 s on 2 quiet cores: 111 s
# converting the model, 310 s the lab; 6.5 GiB resident).
test-real-model: lint $(EXT_STAMP)
	$(PY) -m pytest -q -m real_model tests

# The tests that start no process and train nothing (the `slow` marker): under a minute.
test-fast: lint $(EXT_STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# The style the code keeps (ruff.toml, .clang-format), checked before any test runs.
lint: $(ENV_STAMP)
	$(VENV)/bin/ruff check -q .
	$(VENV)/bin/clang-format --dry-run --Werror csrc/*

build: $(EXT_STAMP)

bench: $(EXT_STAMP)
	$(PY) bench/bench_anchored_kl.py

# The venv sees the system's packages, so a torch that is already installed (GPU images ship
# their own CUDA build) is used as it is; otherwise the CPU wheel goes into the venv.
$(ENV_STAMP): setup.py requirements.txt requirements-nodeps.txt
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	touch $@

# The extension, rebuilt (in full: the editable build compiles in a fresh folder) when the
# C++/CUDA sources change.
$(EXT_STAMP): $(ENV_STAMP) setup.py $(wildcard csrc/*)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build nemo_anchored/_C*.so *.egg-info $(EXT_STAMP)
