# `make test` and `make demo` each create the virtual environment from requirements.txt on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: install test demo docs docs-serve clean

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -e .  # the package itself: tcube-lightning, tcube-lightning-table
	touch $@

install: $(VENV)/.installed

# Two workers (pytest-xdist), one test file each at a time, each torch on one thread: the 2-core machine's cores
# both busy without oversubscribing them (the suite is green on 1 and 2 threads).
test: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto --dist loadfile --durations=15

demo: install
	$(PY) -m tcube_lightning.data.demo --out artifacts/demo
	$(PY) main.py test --config configs/demo.yaml
	$(PY) main.py test --config configs/demo_experts.yaml
	@echo "Where to look: each run's folder under runs/demo and runs/demo_experts (tensorboard/version_N/):"
	@echo "  results.md and summary.md (every table), plots/ (the figures), results.json (everything)."
	@echo "TensorBoard on them: $(VENV)/bin/tensorboard --logdir runs  (then open http://localhost:6006)"

# The documentation site (docs/, mkdocs.yml), built as the suite builds it: strictly, warnings are errors.
docs: install
	$(PY) -m mkdocs build --strict --site-dir site

docs-serve: install
	$(PY) -m mkdocs serve

# What make builds: the environment, the demo's models and data, the site. Never runs/, where results go.
clean:
	rm -rf $(VENV) artifacts site
