# `make test` and `make demo` each create the virtual environment from requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install test demo clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q --durations=15

demo: install
	$(PY) -m tcube_lightning.demo --out artifacts/demo
	$(PY) main.py test --config configs/demo.yaml

clean:
	rm -rf $(VENV) artifacts runs
