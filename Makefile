# cerebrum-jax: every target sets up its own virtual environment (.venv) on first use.
#   make test                 lint + the whole test suite (CPU)
#   make test-fast            lint + the tests not marked slow (the inner loop)
#   make finetune FOLD=3      one fold of the fine-tuning experiment (default: the offline demo cohort)
#   make cv                   all folds and a cross-validation summary
#   make weights              download + verify + convert the published Glasgow weights to weights/glasgow
#   make bench                benchmark against the PyTorch peer, writes BENCHMARKS.md
#   make install GPU=cuda12   the CUDA jaxlib plugin too (GPU=cuda12 or cuda13); GPU=... on finetune/cv/bench too
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/cerebrum-jax

FOLD ?= 3
CONFIG ?= demo
DATA ?=
WEIGHTS ?=
OUT ?= runs/$(CONFIG)
ARGS ?=

GPU ?=
ifneq ($(filter-out cuda12 cuda13,$(GPU)),)
$(error GPU must be cuda12 or cuda13 (or empty for the CPU), not '$(GPU)')
endif
# what every target that runs something needs: the base install, and the GPU plugin when GPU is set
BASE := $(VENV)/.stamp-base $(if $(GPU),$(VENV)/.stamp-$(GPU))

.PHONY: install test test-fast lint format finetune cv weights bench clean wheel

$(VENV)/.stamp-base: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.stamp-cuda12 $(VENV)/.stamp-cuda13: $(VENV)/.stamp-%: $(VENV)/.stamp-base
	$(PY) -m pip install --quiet -e '.[$*]'
	touch $@

$(VENV)/.stamp-test: $(VENV)/.stamp-base
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

# elasticdeform (the original's augmentation, the peer's side) from source: its 0.5.1 wheel is built against
# NumPy 1.x and does not load under the pinned NumPy 2 (a C compiler is needed; seconds)
$(VENV)/.stamp-bench: $(VENV)/.stamp-base
	$(PY) -m pip install --quiet --no-binary elasticdeform -e '.[bench]'
	touch $@

install: $(BASE)

# dist/cerebrum_jax-VERSION-py3-none-any.whl: the package with its named configs and the demo weights
# (setup.py copies experiments/ configs and weights/demo in); pip install it anywhere
wheel: $(VENV)/.stamp-test
	rm -rf build dist
	$(PY) -m pip wheel --no-deps --no-build-isolation --quiet -w dist .

lint: $(VENV)/.stamp-test
	$(VENV)/bin/ruff check cerebrum_jax tests experiments
	$(VENV)/bin/ruff format --check cerebrum_jax tests experiments

format: $(VENV)/.stamp-test
	$(VENV)/bin/ruff format cerebrum_jax tests experiments
	$(VENV)/bin/ruff check --fix cerebrum_jax tests experiments

# Two pytest workers (pytest-xdist) that take tests as they go and steal from each other at the end: XLA
# compiles on one thread, so two workers keep both cores of the CI machine busy (tests/conftest.py: one
# compilation cache for both). JOBS=0 runs the tests in this process.
JOBS ?= 2
PYTEST := $(PY) -m pytest -q $(if $(filter 0,$(JOBS)),,-n $(JOBS) --dist worksteal)

test: $(VENV)/.stamp-test lint
	$(PYTEST) tests

test-fast: $(VENV)/.stamp-test lint
	$(PYTEST) -m "not slow" tests

finetune: $(BASE)
	$(CLI) finetune --config $(CONFIG) --fold $(FOLD) --out $(OUT) \
	  $(if $(DATA),--data $(DATA)) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(ARGS)

cv: $(BASE)
	$(CLI) finetune --config $(CONFIG) --fold all --out $(OUT) \
	  $(if $(DATA),--data $(DATA)) $(if $(WEIGHTS),--weights $(WEIGHTS)) $(ARGS)

weights:
	@if [ -f weights/glasgow/cerebrum.json ]; then \
	  echo "weights/glasgow is already there (remove it to download and convert again)"; \
	else \
	  $(MAKE) --no-print-directory -f $(firstword $(MAKEFILE_LIST)) $(VENV)/.stamp-base && \
	  $(PY) -m cerebrum_jax convert --download weights/glasgow; \
	fi

bench: $(BASE) $(VENV)/.stamp-test $(VENV)/.stamp-bench
	$(PY) experiments/bench.py --out BENCHMARKS.md $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build dist
