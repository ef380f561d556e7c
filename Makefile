# The README's two commands: `make demo` and `make test`. Both set up .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done

.PHONY: setup demo test clean

setup: $(STAMP)

# torch/torchvision first: both lie on local disk for CPU use; the rest mirrors the host's pins.
# stable-diffusion-sdkit ships the host's `ldm` classes; its own pins are ancient, hence --no-deps.
$(STAMP): requirements-host.txt requirements-dev.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -r requirements-host.txt -r requirements-dev.txt
	$(PIP) install -q --no-deps stable-diffusion-sdkit==2.1.5
	$(PY) -c "import torch, torchvision, ldm.models.diffusion.ddpm, open_clip, transformers, gradio" 2>/dev/null
	touch $(STAMP)

demo: setup
	$(PY) -m lora_train demo --output demo-output

test: setup
	$(VENV)/bin/ruff check --select F,E9 lora_train tests benchmarks install.py
	$(PY) -m pytest -q tests

clean:
	rm -rf demo-output fidelity-output .pytest_cache
