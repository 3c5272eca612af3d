# syntax=docker/dockerfile:1.7
# ttrv's images:
#   docker build --target trainer -t ghcr.io/ttrv/ttrv-trainer:0.1.0 .    trainer pods and the rollout service
#   docker build --target operator -t ghcr.io/ttrv/ttrv-operator:0.1.0 .  the kopf operator
# Versions come from pyproject.toml (torch, DeepSpeed, vLLM, transformers are pinned there; tests/test_images.py
# checks that every pin written here agrees). No credentials are used at build time: the pods get them from Secrets
# at run time. Linted by hadolint (tests/test_images.py, .hadolint.yaml).
#
# Base images are pinned by digest. These digests could not be resolved from this repository's build machine (no
# registry is reachable there): they are the ones public repositories pin for the same tags, the CUDA 13.0.0 devel
# one as a BuildKit log shows it pulled. Check them before the first build, and after bumping a tag:
#   docker buildx imagetools inspect nvidia/cuda:13.0.0-devel-ubuntu24.04
#   docker buildx imagetools inspect nvidia/cuda:13.0.0-runtime-ubuntu24.04
#   docker buildx imagetools inspect python:3.12-slim-bookworm

# --- trainer: build stage ---------------------------------------------------------------------------------------
# torch 2.13.0's wheels on PyPI are CUDA 13 builds: DeepSpeed's ops are compiled with the same nvcc (13.0).
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04@sha256:1e8ac7a54c184a1af8ef2167f28fa98281892a835c981ebcddb1fad04bdd452d AS trainer-build
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.12 python3.12-venv python3.12-dev git \
    && rm -rf /var/lib/apt/lists/*
RUN python3.12 -m venv /opt/ttrv
ENV PATH=/opt/ttrv/bin:$PATH
WORKDIR /src

# Dependencies before sources, so editing ttrv does not reinstall torch: a stub package carries pyproject's pins.
COPY pyproject.toml README.md ./
# The install is of this package, whose dependencies pyproject pins (hadolint cannot see that).
# hadolint ignore=DL3013
RUN mkdir ttrv && echo '__version__ = "0"' > ttrv/__init__.py \
    && pip install ".[train,rollout]" \
    && pip uninstall -y ttrv

# flash-attn is optional: the trainer's default attention is PyTorch's sdpa (model.attnImplementation), and vLLM
# brings its own attention kernels. Compiling flash-attn from source for CUDA 13 takes hours and has an open upstream
# build issue, so it is never compiled here. To have it, pass a prebuilt wheel built for this image's torch (2.13.0),
# CUDA (13.0), Python (3.12) and C++ ABI (cxx11abiTRUE):
#   docker build --build-arg FLASH_ATTN_WHEEL=https://.../flash_attn-...-cp312-cp312-linux_x86_64.whl ...
# and set model.attnImplementation: flash_attention_2. docs/gpu.md says how bench/gpu_smoke.py compares both.
ARG FLASH_ATTN_WHEEL=""
# The wheel's URL names its version (hadolint cannot see that).
# hadolint ignore=DL3013
RUN if [ -n "${FLASH_ATTN_WHEEL}" ]; then \
        pip install --no-deps "${FLASH_ATTN_WHEEL}" && python -c "import flash_attn; print(flash_attn.__version__)"; \
    fi

# DeepSpeed's ops, built ahead of time for CUDA rather than JIT-compiled in the pods: the runtime image has no nvcc
# (a devel image is several GB larger), the pods' root filesystem is read-only, and a JIT build would cost minutes on
# every pod start and restart (preemption restarts pods). This builder has no GPU, so both choices DeepSpeed would
# otherwise make from the hardware are made here:
# - DS_ACCELERATOR=cuda: without it DeepSpeed's setup finds no GPU and builds for its CPU accelerator
#   (deepspeed/accelerator/real_accelerator.py, get_accelerator: the override comes first);
# - TORCH_CUDA_ARCH_LIST: without it the cross-compile list is DeepSpeed's default, which includes architectures
#   nvcc 13 no longer supports (deepspeed/ops/op_builder/builder.py, CUDAOpBuilder.compute_capability_args:
#   "TORCH_CUDA_ARCH_LIST takes priority over cross_compile_archs"). 8.0 (A100; its code also runs on 8.6/8.9),
#   9.0 (H100, H200), 10.0 (B200) with PTX for later GPUs.
# CPU Adam (ZeRO-Offload, resources.offloadOptimizer) and fused Adam; the check reads what setup.py recorded
# (deepspeed/git_version_info_installed.py) without importing DeepSpeed, which would look for a GPU.
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0;10.0+PTX"
RUN pip install ninja==1.13.2 packaging==26.4 wheel==0.48.0 \
    && DS_VERSION="$(python -c 'import importlib.metadata as m; print(m.version("deepspeed"))')" \
    && DS_ACCELERATOR=cuda TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}" DS_BUILD_OPS=0 \
       DS_BUILD_CPU_ADAM=1 DS_BUILD_FUSED_ADAM=1 \
       pip install --no-build-isolation --no-deps --force-reinstall "deepspeed==${DS_VERSION}" \
    && python -c 'import importlib.util, pathlib; \
info = {}; \
exec((pathlib.Path(importlib.util.find_spec("deepspeed").origin).parent / "git_version_info_installed.py").read_text(), info); \
ops = info["installed_ops"]; \
assert info["accelerator_name"] == "cuda" and ops["cpu_adam"] and ops["fused_adam"], (info["accelerator_name"], ops)'

COPY . .
# No GPU here, so CUDA extensions are not imported; pip check catches a dependency that the pins broke.
RUN pip install --no-deps . && pip check && python -c "import ttrv.manifests"

# --- trainer: runtime -------------------------------------------------------------------------------------------
FROM nvidia/cuda:13.0.0-runtime-ubuntu24.04@sha256:95318efecfd68ab3d109da5277863257b06137c84f34a87f38de970d5cd035d3 AS trainer
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
FROM python:3.12-slim-bookworm@sha256:782412e85d0f0984994c290652577d4018aff08145c85b262bb63dc0c7522254 AS operator
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
