# Two entry points for a fresh machine: `make demo` and `make test`. Both build .venv themselves.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Train, evaluate over HTTP (default: score-first TTT + n-gram) and as the seed claims (hashed-940), verify the
# compliant report, then compare the two: table, PNG and SVG under runs/demo/compare/.
demo: $(STAMP)
	$(PY) -m service demo --workdir runs/demo --data data/embedded
	$(PY) -m verifier check runs/demo/train/model.pgolf --train-log runs/demo/train/summary.json \
		--train-log runs/demo/train/train.log --eval-report runs/demo/eval.ndjson
	$(PY) -m verifier compare runs/demo/train/model.pgolf --data data/embedded \
		--honest-report runs/demo/eval.ndjson --claimed-report runs/demo/claimed.ndjson --out runs/demo/compare

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) runs .pytest_cache
