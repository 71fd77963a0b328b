# The README's two commands. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: test lint demo selection-study install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# The demo needs the package alone; the tests also need their references (torch, PEFT) and libtpu.
$(VENV)/.installed-demo: setup.py | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed: setup.py | $(BIN)/python
	$(BIN)/pip install -q -e '.[test,tpu]'
	touch $@ $(VENV)/.installed-demo

install: $(VENV)/.installed

demo: $(VENV)/.installed-demo
	$(BIN)/python -m speechlm_jax.demo.main --out demo_out

# SALAD stage 2's seed study on the demo's world (after the demo; its stages are cached too).
selection-study: demo
	$(BIN)/python -m speechlm_jax.demo.selection_study --demo demo_out --out demo_out/selection_study

# The formatter and linter settings are in pyproject.toml.
lint: $(VENV)/.installed
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile -q --durations=25 tests

clean:
	rm -rf $(VENV) demo_out .pytest_cache
