# Two commands a newcomer needs (see README):
#   make demo   set up .venv, build Fashion-MNIST shards, train standard, SAT and the shuffled control, evaluate, compare
#   make test   set up .venv, run the test suite
# and the study of issue 12 (about 2 hours on a 2-core CPU; see configs/fashion-mnist-study.toml):
#   make study  build every shard set it needs, run the grid; a rerun skips finished work
VENV ?= .venv
PY := $(VENV)/bin/python
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: setup test demo demo-shards study study-shards clean-shards

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

# re-running is cheap: complete shard sets are verified and kept, finished runs and evaluations are skipped
demo-shards: setup
	$(VENV)/bin/preprocess build-shards fashion-mnist --split train --out shards/fashion-mnist/train
	$(VENV)/bin/preprocess build-shards fashion-mnist --split test --out shards/fashion-mnist/test
	# the control: every image gets another image's map (a seeded derangement)
	$(VENV)/bin/preprocess shuffle-saliency shards/fashion-mnist/train --out shards/fashion-mnist-shuffled/train --seed 0

demo: demo-shards
	$(VENV)/bin/sat-train experiment configs/fashion-mnist-demo.toml
	@echo "report: experiments/fashion-mnist-demo/report/report.md"

# the study's [sources]; its teacher set is made by the experiment itself, after the standard run it explains
study-shards: demo-shards
	$(VENV)/bin/preprocess build-shards fashion-mnist --split train --saliency foreground-box \
		--out shards/fashion-mnist-box/train
	$(VENV)/bin/preprocess build-shards fashion-mnist --split train --saliency none --out shards/fashion-mnist-none/train

STUDY ?= configs/fashion-mnist-study.toml
study: study-shards
	$(VENV)/bin/sat-train experiment $(STUDY)
	@echo "report: experiments/fashion-mnist-study/report/report.md"
