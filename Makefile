# The two commands a new user needs: `make run` and `make test`. Each creates .venv on first use.
# Without make: `cxr-refine run|repro|compare|real|viewer|bench|presets|fresh-draw|users` does what the
# targets do (on PATH after the install below, or `pip install .`; `cxr-refine --help`).
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1
export GRADIO_ANALYTICS_ENABLED := False
export DVC_NO_ANALYTICS := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
# the temporary Prefect server can need > 20 s to start on a busy 2-core machine
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 300
export PYTHONUNBUFFERED := 1

.PHONY: run test test-all viewer bench bench-gpu repro compare real clean reliability

# pyproject.toml holds the ranges, constraints.txt the exact versions tested together. uv installs them
# (in about a minute on this machine, where pip took 7 min: its downloads are sequential), with pip's own
# index settings (`pip config list`: index-url, extra-index-url, find-links); pip installs where uv cannot.
# --compile-bytecode as pip does: without .pyc files (and with PYTHONDONTWRITEBYTECODE set, as on this
# machine) every stage process compiled torch, dvc and the rest again, and `make run` took 1.5x as long.
UV_INSTALL = $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python --index-strategy unsafe-best-match \
	-c constraints.txt
PIP_INDEXES = $(BIN)/python -m pip config list 2>/dev/null \
	| sed -nE "s/^[^=]*\.(index-url|extra-index-url|find-links)='(.*)'$$/\1 \2/p" \
	| while read -r key urls; do for u in $$urls; do printf -- '--%s %s ' "$$key" "$$u"; done; done

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -c 'import pipeline'  # a Python outside requires-python stops here, in one line
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt uv || echo "uv could not be installed; pip installs instead" >&2
	# torch first, alone: the local wheel is taken where one is provided
	indexes="$$($(PIP_INDEXES))"; \
	{ $(UV_INSTALL) $$indexes torch torchvision && $(UV_INSTALL) $$indexes -e '.[dev]'; } || { \
		echo "uv could not install; installing with pip" >&2; \
		$(BIN)/python -m pip install -q -c constraints.txt torch torchvision \
		&& $(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'; }
	touch $(STAMP)

run: $(STAMP)  ## the whole refinement cycle on the defaults (phantom), via the Prefect flow
	@test -d .git || git init -q
	@$(BIN)/python -m pipeline.config params.yaml
	$(BIN)/python -m flows.refine
	@$(BIN)/python -m pipeline.report

compare: $(STAMP)  ## the cycle under each enhancement policy (DVC experiments) -> reports/policies/
	$(BIN)/python -m flows.compare

# real films: Kermany (the chest_xray/ folder), the U-Net on JSRT + SCR masks, the shortcut audit on;
# without folders: $$CXR_REAL_DATA/{kermany-224/chest_xray,jsrt-scr} (default ../shared/data)
POLICIES ?= counterfactual overlay
real: $(STAMP)  ## the cycle on real films (DVC experiments real-<policy>) -> reports/, reports/real/
	$(BIN)/python -m flows.real $(if $(KERMANY),--kermany "$(KERMANY)") $(if $(JSRT),--jsrt "$(JSRT)") $(POLICIES)

repro: $(STAMP)  ## the same artefacts with DVC alone
	$(BIN)/dvc repro
	@$(BIN)/python -m pipeline.report

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow and not network" -n 2 --dist loadscope --no-loadscope-reorder --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

# the reliability suite (README "Reliability"), long (`slow`) variants included; modules not written yet are left out
RELIABILITY_TESTS := tests/test_crash_consistency.py tests/test_kill_resume.py tests/test_determinism.py \
	tests/test_fuzz_decoder.py tests/test_fuzz_http.py tests/test_fuzz_bombs.py tests/test_fuzz_regressions.py tests/test_phi.py \
	tests/test_security_checkpoints.py tests/test_security_lint.py tests/test_security_auth.py tests/test_advisories.py \
	tests/test_viewer_api.py tests/test_sanity.py tests/test_pipeline_attacks.py tests/test_viewer_attacks.py

reliability: $(STAMP)  ## the reliability suite -> reports/reliability.json (saliency figures from the last `make run`)
	@log=$$(mktemp -t cxr-reliability.XXXXXX); junit=$$(mktemp -t cxr-junit.XXXXXX); \
	CXR_RELIABILITY_LOG=$$log $(BIN)/python -m pytest -q -p no:cacheprovider --junitxml=$$junit \
		$(wildcard $(RELIABILITY_TESTS)); status=$$?; \
	$(BIN)/python -m tests.reliability_report --log $$log --junit $$junit --sanity reports/sanity.json \
		--summary reports/summary.json --out reports/reliability.json || status=1; \
	rm -f $$log $$junit; exit $$status

viewer: $(STAMP)  ## the clinician's viewer on http://$${CXR_HOST:-127.0.0.1}:$${CXR_PORT:-7860}/ (users: CXR_USERS=name:pw or .cxr/users.json)
	$(BIN)/python -m pipeline.viewer

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run

bench-gpu: $(STAMP)  ## GPU figures + a CheXpert-cycle projection -> reports/benchmarks.json `gpu` (needs CUDA)
	$(BIN)/python -m benchmarks.gpu

clean:  ## remove the pipeline's outputs (the DVC cache keeps them: `dvc repro` restores what is unchanged)
	rm -rf data/prepared data/segment data/audit data/cams data/enhanced models/c* models/unet models/sanity_twin models/.resume models/latest.json reports/cycles reports/train reports/segment reports/enhance reports/figures reports/index.html reports/summary.json reports/sanity.json
