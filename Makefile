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

# The main job on the bundled digits (no download, a few minutes on 2 CPU cores): train a small VGG, prune half
# of its MACs with the L1 criterion, fine-tune briefly, and compare; then evaluate the saved pruned file.
demo: setup
	$(PY) -m prune_cli train --model vgg11 --dataset digits --epochs 6 --out demo/base.safetensors
	$(PY) -m prune_cli prune demo/base.safetensors --criterion l1 --target-macs 0.5 --finetune-epochs 2 \
		--out demo/pruned-l1.safetensors
	$(PY) -m prune_cli eval demo/pruned-l1.safetensors

test: setup
	$(PY) -m pytest -q

test-all: setup
	$(PY) -m pytest -q -m ''

bench: setup
	$(PY) benchmarks/engine_throughput.py
	$(PY) benchmarks/surgery.py

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
