# Two commands a newcomer needs (see README):
#   make demo   set up .venv, build Fashion-MNIST shards, train standard + SAT, evaluate, compare
#   make test   set up .venv, run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup test demo clean-shards

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	# torch first, pinned: a bare `torch` would pull a multi-GB CUDA build
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	# torchattacks pins torchvision, which does not import beside this torch; its attacks need none of it
	$(PY) -m pip install -q --no-deps "torchattacks>=3.5"
	touch $@

$(FMNIST):
	# the real Fashion-MNIST, shipped by Debian (no download at run time)
	(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null

setup: $(VENV)/.installed $(FMNIST)

test: setup
	$(PY) -m pytest -q

demo: setup
	# re-running is cheap: complete shards are verified and kept, a finished run is skipped
	$(VENV)/bin/preprocess build-shards fashion-mnist --split train --out shards/fashion-mnist/train
	$(VENV)/bin/preprocess build-shards fashion-mnist --split test --out shards/fashion-mnist/test
	$(VENV)/bin/sat-train experiment configs/fashion-mnist-demo.toml
	@echo "report: experiments/fashion-mnist-demo/report/report.md"
