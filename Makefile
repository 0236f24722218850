# Two commands a fresh machine needs (see README):
#   make demo   set up .venv and run `trtconv build` on the built-in default recipe
#   make test   set up .venv and run the test suite (CI runs exactly this, via .ci/run)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch first, so that nothing below pulls a multi-GB CUDA build. On a GPU machine
# pass your own, e.g. `make setup TORCH=torch` (trtconv itself accepts any torch >= 2.8).
TORCH ?= torch==2.13.0
OUT ?= out/default
PYTEST_ARGS ?=

.PHONY: setup demo test test-unit test-fast clean

setup: $(VENV)/.installed

# pip runs quietly, so each step says first what it installs and about how long it takes (measured on
# a fresh 2-core host: 94 s for both; once installed, nothing runs again).
$(VENV)/.installed: pyproject.toml constraints.txt
	@echo "setup: creating $(VENV) (one time; later runs skip this)"
	$(PYTHON) -m venv $(VENV)
	@echo "setup: installing $(TORCH), then trtconv's pinned dependencies: together about 1.5 min (94 s on a fresh 2-core host), pip is quiet meanwhile"
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH)"
	@echo "setup: installing trtconv and its pinned dependencies (constraints.txt: transformers, ModelOpt, ...)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test]'
	@echo "setup: done"
	touch $@

demo: setup
	$(BIN)/trtconv build default -o $(OUT) --force
	$(BIN)/trtconv verify $(OUT)

# pytest's exit 5 ("no tests collected") must never pass CI by accident: it is turned into a failure.
test: setup
	@HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: treating that as a failure"; exit 1; fi; exit $$rc

# Tiers (tests/README.md): unit (no ModelOpt export, seconds), contract (real ModelOpt exports of tiny
# models), engine (through the TensorRT-LLM test double), e2e (the real CLI). `make test` runs them all.
test-unit: setup
	@HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest tests/unit -m "not slow" $(PYTEST_ARGS)

test-fast: setup
	@HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -m "not slow and not integration" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) out .pytest_cache
