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
	$(PY) -m pip install -q -e '.[dev,onnx,ray]'
	touch $(STAMP)

# The main job on the bundled digits (no download, about 10 minutes on 2 CPU cores): train a small VGG once, prune
# it with every criterion to two MACs targets with two seeds, fine-tune each the same, and print the leaderboard.
demo: setup
	$(PY) -m prune_cli compare experiments/quickstart.yaml --jobs 2

# Two worker processes (one torch thread each) use both cores; a test file stays on one worker, so its
# module fixtures (a trained base model, a comparison grid) are built once.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile

test-all: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m ''

bench: setup
	$(PY) benchmarks/engine_throughput.py
	$(PY) benchmarks/surgery.py

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
