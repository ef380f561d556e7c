# The README's two commands: `make demo` and `make test`. Both set up .venv first (idempotent).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
# The same tests under gradio 4.40 (Forge): .venv with requirements-gradio4.txt over it.
VENV4 := .venv-gradio4
PY4 := $(VENV4)/bin/python
STAMP4 := $(VENV4)/.setup-done

# tests/test_browser.py drives the Train tab in Debian's chromium (playwright is only the Python
# client from requirements-dev.txt; it never downloads a browser).
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# fonts-wqy-zenhei: the zh_CN screenshots show Chinese, not boxes
APT_INSTALL := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium fonts-wqy-zenhei

.PHONY: setup setup-gradio4 demo test test-gradio4 clean browser

setup: $(STAMP)

# torch/torchvision first: both lie on local disk for CPU use; the rest mirrors the host's pins.
# stable-diffusion-sdkit ships the host's `ldm` classes; its own pins are ancient, hence --no-deps.
$(STAMP): requirements-host.txt requirements-dev.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q torch==2.14.1 torchvision==0.29.1
	$(PIP) install -q -r requirements-host.txt -r requirements-dev.txt
	$(PIP) install -q --no-deps stable-diffusion-sdkit==2.1.5
	$(PY) -c "import torch, torchvision, ldm.models.diffusion.ddpm, open_clip, transformers, gradio, playwright.sync_api" 2>/dev/null
	touch $(STAMP)

# A copy of .venv made of hard links (seconds, no second 6 GB), then pip swaps gradio 3 for 4 in it:
# pip unlinks every file it replaces or removes, so .venv's own files are never written through the
# links. Rebuilt whole when .venv or the pins change. Run its python as `$(PY4) -m ...`: the scripts in
# its bin/ still start .venv's python.
setup-gradio4: $(STAMP4)

$(STAMP4): $(STAMP) requirements-gradio4.txt
	rm -rf $(VENV4)
	cp -al $(VENV)/. $(VENV4)
	rm -f $(STAMP4)
	$(PY4) -m pip install -q -r requirements-gradio4.txt
	$(PY4) -c "import gradio; assert gradio.__version__ == '4.40.0', gradio.__version__"
	touch $(STAMP4)

demo: setup
	$(PY) -m lora_train demo --output demo-output

browser:
	@(test -x $(CHROMIUM) && test -d /usr/share/fonts/truetype/wqy) || $(APT_INSTALL) || ($(SUDO) apt-get update -q && $(APT_INSTALL))

# Two workers (pytest-xdist) for the two cores, one test file each at a time: a file's module fixtures
# (the shared fidelity run, the browser session) are built once, on one worker.
test: setup browser
	$(VENV)/bin/ruff check --select F,E9 lora_train tests benchmarks install.py
	$(PY) -m pytest -q --durations=25 -n 2 --dist loadfile tests
	$(MAKE) --no-print-directory test-gradio4

# The tests that build or drive the tabs (marked `gradio`: the browser tests among them) under gradio 4.40.
test-gradio4: setup-gradio4 browser
	$(PY4) -m pytest -q --durations=10 -n 2 --dist loadfile -m gradio tests

clean:
	rm -rf demo-output fidelity-output .pytest_cache
