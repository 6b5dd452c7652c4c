# The README's two commands: `make setup` then `make test` (or `make demo`). Each target installs first.
PY := .venv/bin/python
STAMP := .venv/.installed

.PHONY: setup demo test test-all bench lint

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	# Pinned first: these come from the local disk cache; an unpinned torch would download several GB.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(PY) -m prune_cli train --model vgg11 --dataset digits --epochs 8 --out demo/base.safetensors
	$(PY) -m prune_cli eval demo/base.safetensors --dataset digits

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

bench: setup
	$(PY) benchmarks/engine_throughput.py

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
