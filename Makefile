# The two README commands. Both install into .venv first (once).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The demo's paths are absolute: `ray job submit --working-dir .` uploads the repo without
# git-ignored folders, and the job must still find the corpus and the output on this machine.
DEMO_CORPUS := $(CURDIR)/data/demo-corpus
DEMO_OUT := $(CURDIR)/out/demo
RAY_DASHBOARD := http://127.0.0.1:8265
# The Ray head runs the job's `python`: start it with the venv first on PATH. Ray 2.60 turns token
# auth on for a head whenever a token file exists (any local ray.init() writes one), so client and
# head both use it explicitly.
VENV_PATH := PATH=$(CURDIR)/$(VENV)/bin:$$PATH RAY_AUTH_MODE=token

.PHONY: install test lint demo

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: these two wheels are on the workplace's local disk.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The cluster tests start their own Ray clusters, so they run in a process that never called ray.init().
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --ignore=tests/test_ray_cluster.py
	$(PY) -m pytest -q -p no:cacheprovider tests/test_ray_cluster.py

lint: $(STAMP)
	$(PY) -m ruff check pipeline jobs schemas tests

demo: $(STAMP)
	test -f $(DEMO_CORPUS)/test/shard-00000.tar || $(PY) jobs/make_demo_corpus.py --out $(DEMO_CORPUS) \
		--seed 0 --train 0 --val 0 --test 1000 --formats webdataset
	$(VENV_PATH) ray status >/dev/null 2>&1 || $(VENV_PATH) ray start --head --num-cpus=2 \
		--disable-usage-stats --dashboard-host=127.0.0.1
	$(VENV_PATH) ray job submit --address $(RAY_DASHBOARD) --working-dir . -- \
		python jobs/caption_shards.py --input '$(DEMO_CORPUS)/test/*.tar' --output $(DEMO_OUT) \
		--keep-top-fraction 0.9 --overwrite
	$(PY) jobs/report.py $(DEMO_OUT)
