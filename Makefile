# Every target creates .venv/ and installs what it needs first, pinned by constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test test-all bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)  ## the whole loop on synthetic slides: tile, pretrain, finetune, segment, report (pipelines/demo.yaml)
	$(BIN)/gsd-wsi run pipelines/demo.yaml -o demo-out

test: $(STAMP)  ## the test suite CI runs (slow tests excluded)
	$(BIN)/python -m pytest -q

test-all: $(STAMP)  ## every test, slow ones included
	$(BIN)/python -m pytest -q -m ''

bench: $(STAMP)  ## the tiling benchmark (minutes; figures go to docs/benchmarks.md)
	$(BIN)/python benchmarks/bench_tile.py --out bench-out

clean:
	rm -rf demo-out bench-out .pytest_cache
