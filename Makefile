PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow bench clean docs-check

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[all]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	rm -rf runs/tiny
	$(BIN)/seqshard launch examples/tiny.yaml
	$(BIN)/seqshard summary runs/tiny

test: install
	$(BIN)/python -m pytest -q tests

test-slow: install
	$(BIN)/python -m pytest -q -m slow tests

clean:
	rm -rf $(VENV) runs

docs-check: install
	$(BIN)/python -m pytest -q tests/test_docs.py tests/launch/test_spec_reference.py
