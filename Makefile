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
# The Ray head starts with the venv first on PATH, and the job names the venv's python: a head
# someone started outside the venv runs it all the same. The demo is local:
# a RAY_ADDRESS pointing elsewhere is not used. Token auth is on (Ray's default for a new local
# cluster); a head already running without it accepts the token too.
RAY := env -u RAY_ADDRESS PATH=$(CURDIR)/$(VENV)/bin:$$PATH RAY_AUTH_MODE=token $(CURDIR)/$(VENV)/bin/ray

.PHONY: install test lint demo peer-env cluster-token

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision go first, as a pinned pair (each torchvision release is built for one torch
	# release): the default wheels are the CUDA 13 build, about 5 GB with its CUDA libraries, which
	# also runs on CPUs; pinning keeps pip from fetching another multi-GB build on a later install.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The cluster tests start their own Ray clusters, so they run in a process that never called ray.init().
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --ignore=tests/test_ray_cluster.py
	$(PY) -m pytest -q -p no:cacheprovider tests/test_ray_cluster.py

# clip-retrieval, the peer `jobs/benchmark.py commands` times, in a virtual environment of its own: its pins
# (pyarrow, webdataset, an older open_clip) differ from ours. setuptools<81 keeps the pkg_resources it imports.
peer-env:
	test -x .venv-peer/bin/python || $(PYTHON) -m venv .venv-peer
	.venv-peer/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
	.venv-peer/bin/python -m pip install -q clip-retrieval "setuptools<81"

# The token of the cluster cluster.yaml launches: made once here (only where there is none), copied to every
# node by cluster.yaml's file_mounts, and read by `RAY_AUTH_MODE=token ray job submit`. Never commit it.
cluster-token: $(STAMP)
	@$(RAY) get-auth-token --generate >/dev/null && echo "cluster token: $$HOME/.ray/auth_token"

lint: $(STAMP)
	$(PY) -m ruff check pipeline jobs schemas tests

$(DEMO_CORPUS)/test/shard-00000.tar: | $(STAMP)
	$(PY) jobs/make_demo_corpus.py --out $(DEMO_CORPUS) --seed 0 --train 0 --val 0 --test 1000 --formats webdataset

# Submits the job to the local Ray head: the one already running, or one started here with every core
# and stopped again at the end. `ray get-auth-token --generate` writes ~/.ray/auth_token only where
# there is none. --overwrite: the output is replaced only when the bundle or settings changed;
# otherwise the finished run is reported complete.
demo: $(STAMP) $(DEMO_CORPUS)/test/shard-00000.tar
	@$(RAY) get-auth-token --generate >/dev/null
	@if $(RAY) status >/dev/null 2>&1; then started=; echo "demo: using the Ray head already running"; \
	else $(RAY) start --head --disable-usage-stats --dashboard-host=127.0.0.1 >/dev/null || exit 1; \
		started=1; echo "demo: started a local Ray head (dashboard $(RAY_DASHBOARD))"; fi; \
	$(RAY) job submit --address $(RAY_DASHBOARD) --working-dir . -- \
		$(CURDIR)/$(PY) jobs/caption_shards.py --input '$(DEMO_CORPUS)/test/*.tar' --output $(DEMO_OUT) \
		--keep-top-fraction 0.9 --overwrite; submitted=$$?; \
	if [ -n "$$started" ]; then $(RAY) stop >/dev/null 2>&1; echo "demo: stopped the Ray head it started"; fi; \
	exit $$submitted
	$(PY) jobs/report.py $(DEMO_OUT)
