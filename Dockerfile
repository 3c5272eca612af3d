# syntax=docker/dockerfile:1.7
# ttrv's images:
#   docker build --target trainer -t ghcr.io/ttrv/ttrv-trainer:0.1.0 .    trainer pods and the rollout service
#   docker build --target operator -t ghcr.io/ttrv/ttrv-operator:0.1.0 .  the kopf operator
# Versions come from pyproject.toml (torch, DeepSpeed, vLLM, transformers are pinned there); only flash-attn,
# which cannot be a dependency of a CPU install, is pinned here. No credentials are used at build time: the pods
# get them from Secrets at run time.

ARG CUDA_VERSION=13.0.0
ARG UBUNTU=ubuntu24.04

# --- trainer: build stage ---------------------------------------------------------------------------------------
# torch 2.13.0's wheels on PyPI are CUDA 13 builds: flash-attn and DeepSpeed's ops are compiled with the same nvcc.
FROM nvidia/cuda:${CUDA_VERSION}-devel-${UBUNTU} AS trainer-build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev git \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/ttrv
ENV PATH=/opt/ttrv/bin:$PATH
WORKDIR /src

# Dependencies before sources, so editing ttrv does not reinstall torch: a stub package carries pyproject's pins.
COPY pyproject.toml README.md ./
RUN mkdir ttrv && echo '__version__ = "0"' > ttrv/__init__.py \
    && pip install ".[train,rollout]" \
    && pip uninstall -y ttrv

ARG FLASH_ATTN_VERSION=2.8.3.post2
# Each compile job takes several GB of memory.
ARG MAX_JOBS=8
RUN pip install ninja packaging wheel \
    && MAX_JOBS=${MAX_JOBS} pip install --no-build-isolation "flash-attn==${FLASH_ATTN_VERSION}"

# DeepSpeed's CPU Adam (ZeRO-Offload) and fused Adam, compiled now: the runtime image has no nvcc to JIT them.
RUN DS_VERSION="$(python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')" \
    && DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 \
       pip install --no-build-isolation --no-deps --force-reinstall "deepspeed==${DS_VERSION}"

COPY . .
# No GPU here, so CUDA extensions are not imported; pip check catches a dependency that the pins broke.
RUN pip install --no-deps . && pip check && python -c "import ttrv.manifests"

# --- trainer: runtime -------------------------------------------------------------------------------------------
FROM nvidia/cuda:${CUDA_VERSION}-runtime-${UBUNTU} AS trainer
ENV DEBIAN_FRONTEND=noninteractive
# Triton compiles its CUDA launcher with gcc against Python.h on first use, also at run time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# Ubuntu's images ship a user `ubuntu` with uid 1000, the uid the pods run as (ttrv/manifests.py).
RUN userdel --remove ubuntu 2>/dev/null; useradd --uid 1000 --user-group --home-dir /tmp --no-create-home ttrv
COPY --from=trainer-build /opt/ttrv /opt/ttrv
# The pods' root filesystem is read-only: HOME and the caches are emptyDirs mounted at /tmp and /cache.
ENV PATH=/opt/ttrv/bin:$PATH PYTHONUNBUFFERED=1 HOME=/tmp XDG_CACHE_HOME=/cache HF_HOME=/cache/huggingface \
    VLLM_NO_USAGE_STATS=1
WORKDIR /tmp
USER 1000:1000
CMD ["ttrv", "--help"]

# --- operator ---------------------------------------------------------------------------------------------------
# The operator imports ttrv.spec, ttrv.crds and ttrv.manifests (pydantic, PyYAML), never torch: ttrv goes in
# without its dependencies, plus the `operator` extra.
FROM python:3.12-slim-bookworm AS operator
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
WORKDIR /src
COPY . .
RUN python -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["operator"]))' > /tmp/operator-requirements.txt \
    && pip install -r /tmp/operator-requirements.txt \
    && pip install --no-deps . \
    && rm -rf /src /tmp/operator-requirements.txt \
    && python -c "import kopf, ttrv.manifests"
RUN useradd --uid 1000 --user-group --home-dir /tmp --no-create-home ttrv
WORKDIR /tmp
USER 1000:1000
CMD ["kopf", "run", "--standalone", "--all-namespaces", "-m", "operators.ttrv_operator"]
