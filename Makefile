# mage-hf: `make demo` runs the main job, `make test` runs the test suite. Both install into .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch (and the torchvision made for it); a bare `torch` requirement would pull a multi-GB CUDA
# build. The constraints file keeps later installs from replacing it.
CONSTRAINTS ?= constraints-cpu.txt
# Where the CPU build comes from: PyPI's torch wheels for Linux are the CUDA build. (Wheels in a local find-links
# folder are taken too.) Only torch itself: its dependencies come from the usual index with the package's.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

OUTPUT ?= outputs

.PHONY: install demo demo-model test test-fast test-slow test-eval clean

# The package and its runtime dependencies (enough for the demo), then the test, training and Space extras.
$(VENV)/.core: pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-deps --index-url $(TORCH_INDEX) -c $(CONSTRAINTS) torch
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e .
	touch $@

$(VENV)/.installed: $(VENV)/.core
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The main job, offline: generate, inpaint and outpaint with the embedded demo model (trained by
# training/recipes/emoji); pictures in $(OUTPUT)/. Any other pipeline folder or Hub repo id: make demo MODEL=...
demo: $(VENV)/.core
	$(PY) -m mage_hf.demo --output "$(OUTPUT)" $(if $(MODEL),--model "$(MODEL)")

# Rebuild the embedded demo model from scratch (about an hour and a half on 2 CPU cores; see training/recipes/emoji).
demo-model: install
	SHIP=1 bash training/recipes/emoji/train.sh $(OUTPUT)/emoji-recipe

# The whole suite: the default selection, the real-size (slow) checks, then the FID/IS (eval) checks.
test: install
	$(PY) -m pytest -q
	$(PY) -m pytest -q -m slow
	$(MAKE) test-eval

test-fast: install
	$(PY) -m pytest -q

test-slow: install
	$(PY) -m pytest -q -m slow

# FID/IS need torch-fidelity, which needs torchvision, and no torchvision works with the CPU torch above. The eval
# checks get their own environment with a pair that does (a CUDA build of torch that also runs on the CPU, ~5.5 GB).
EVAL_VENV ?= .venv-eval
EVAL_PY := $(EVAL_VENV)/bin/python
EVAL_TORCH ?= torch==2.14.1 torchvision==0.29.1

$(EVAL_VENV)/.installed: pyproject.toml
	test -x $(EVAL_PY) || $(PYTHON) -m venv $(EVAL_VENV)
	$(EVAL_PY) -m pip install --quiet --upgrade pip
	$(EVAL_PY) -m pip install --quiet $(EVAL_TORCH)
	$(EVAL_PY) -m pip install --quiet -e ".[test,eval]" $(EVAL_TORCH)
	touch $@

test-eval: $(EVAL_VENV)/.installed
	$(EVAL_PY) -m pytest -q -m eval

clean:
	rm -rf $(OUTPUT) .pytest_cache build src/*.egg-info
