"""Bad specs, data, model folders and credentials through the real trainer entrypoint (`python -m ttrv.train`, and
once through `ttrv run`): each process must exit with its permanent code (2 spec, 3 data, 4 model; exitcodes.py),
so the training operator fails the job instead of restarting it, name the field and the fix, and have written
nothing: no events, no report, no object in the store. The processes start together, a few at a time; each costs
seconds of imports, so further variants of the same failure run the same functions in this process."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from k8s_util import ROOT
from operator_fixtures import NOW, NS, failed, job, pod
from PIL import Image

from bad_inputs.catalogue import CREDENTIAL, Case, cases, check, files_under, s3_objects
from operators.runs import Observed, decide_run, desired_children
from ttrv import exitcodes
from ttrv.manifests import adaptation_run
from ttrv.spec import ExperimentSpec, RunSpec
from ttrv.train import exit_code_for, load_examples, load_learner_and_engine
from ttrv.weights import BUNDLED

TINY_MODEL = BUNDLED["ttrv://tiny-qwen2vl"]
BASE = {
    "name": "bad",
    "data": {"path": "ttrv://tiny-shapes/test", "subsetSize": 4},
    "rollout": {"votes": 2, "groupSize": 2, "maxNewTokens": 2},
    "grpo": {"epochs": 1, "promptsPerStep": 2},
    "eval": {"before": False, "after": False},
    "resources": {"gpusPerNode": 0},
}
PROMPT = "<image>\nWhich shape is shown? Options:\nA. circle\nB. square\nC. triangle\nD. star"
MODEL_FIX = "point it at a Hugging Face folder with config.json, weights, tokenizer and processor files"


def model_folder(folder: Path, keep: tuple[str, ...] = (), write: dict[str, str] | None = None) -> Path:
    """A copy of the bundled tiny checkpoint with only the files in `keep`, plus `write`."""
    model = folder / "model"
    model.mkdir()
    for name in keep:
        shutil.copy(TINY_MODEL / name, model / name)
    for name, text in (write or {}).items():
        (model / name).write_text(text)
    return model


def images_jsonl(folder: Path, missing: int) -> Path:
    """Eight records with images beside them, record `missing`'s image absent."""
    for i in range(8):
        if i != missing:
            Image.new("RGB", (28, 28), (30 * i, 0, 0)).save(folder / f"{i}.png")
    path = folder / "test.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "prompt": PROMPT, "image_path": f"{i}.png", "answer": "A"})
                            + "\n" for i in range(8)))
    return path


def one_record(folder: Path, image: str, prompt: str = PROMPT, make=None) -> Path:
    """A one-record test set whose image `image` is made by `make(path)` (a 28x28 PNG by default)."""
    (make or (lambda path: Image.new("RGB", (28, 28)).save(path)))(folder / image)
    path = folder / "test.jsonl"
    path.write_text(json.dumps({"id": "0", "prompt": prompt, "image_path": image, "answer": "A"}) + "\n")
    return path


def examples_of(path: Path):
    return load_examples(RunSpec.model_validate(BASE | {"data": {"path": str(path), "subsetSize": None}}))


def bad_jsonl(folder: Path) -> Path:
    path = folder / "test.jsonl"
    path.write_text(json.dumps({"id": "0", "prompt": PROMPT}) + "\n{oops\n")
    return path


BERT = json.dumps({"model_type": "bert", "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
                   "num_attention_heads": 1, "intermediate_size": 8})
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
ALL_BUT_TOKENIZER = tuple(p.name for p in sorted(TINY_MODEL.iterdir()) if p.name not in TOKENIZER_FILES)
ALL_BUT_CONFIG = tuple(p.name for p in sorted(TINY_MODEL.iterdir()) if p.name != "config.json")

# input: (how the process starts, the exit code it must end with, what the case changes in the spec)
TRAINERS = cases("trainer", [
    ("spec-group-larger-than-votes",
     ("train", exitcodes.BAD_SPEC, lambda folder: {"rollout": {"votes": 2, "groupSize": 4}}),
     ("spec.yaml", "rollout", "groupSize (4) > votes (2)"), "set groupSize <= votes"),
    ("data-bad-jsonl-line-via-ttrv-run",
     ("run", exitcodes.BAD_DATA, lambda folder: {"data": {"path": str(bad_jsonl(folder))}}),
     ("test.jsonl:2",), "one object per line"),
    ("model-not-a-checkpoint",
     ("train", exitcodes.BAD_MODEL,
      lambda folder: {"model": {"path": str(model_folder(folder, write={"README.md": "notes"}))}}),
     ("model.path",), MODEL_FIX),
    ("store-wrong-credentials",
     ("train", exitcodes.BAD_SPEC,
      lambda folder: {"storage": {"uri": f"s3://ttrv-test/wrong-credentials-{secrets.token_hex(3)}"}}),
     ("SignatureDoesNotMatch",), "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"),
])


def launch(case: Case, folder: Path, s3_server) -> dict:
    how, _, change = case.input
    spec = BASE | {"storage": {"uri": f"file://{folder / 'store'}"}}
    spec |= {key: spec.get(key, {}) | value for key, value in change(folder).items()}
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec))
    module = ["ttrv.train", "--spec"] if how == "train" else ["ttrv.cli", "run"]
    env = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    if spec["storage"]["uri"].startswith("s3://"):
        # the right access key with a wrong secret: the server answers SignatureDoesNotMatch
        env |= s3_server.env() | {"AWS_SECRET_ACCESS_KEY": CREDENTIAL}
    before = s3_objects(s3_server)
    result = subprocess.run([sys.executable, "-m", *module, str(folder / "spec.yaml"), "--out", str(folder / "out")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return {"result": result, "folder": folder, "s3_written": sorted(set(s3_objects(s3_server)) - set(before))}


@pytest.fixture(scope="module")
def trainers(tmp_path_factory, s3_server) -> dict[str, dict]:
    if not s3_server.running:
        s3_server.start()
    with ThreadPoolExecutor(len(TRAINERS)) as pool:
        futures = {param.id: pool.submit(launch, param.values[0], tmp_path_factory.mktemp(param.id), s3_server)
                   for param in TRAINERS}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", TRAINERS)
def test_trainer_exits_with_its_permanent_code_and_writes_nothing(case: Case, trainers, request, s3_server):
    outcome = trainers[request.node.callspec.id]
    result, folder = outcome["result"], outcome["folder"]
    # the output folder may exist, empty (and with the spec `ttrv run` hands the trainer); the store holds nothing
    # out/.lock: the run folder's lock file (ttrv.lifetime.RunLock); the kernel frees the lock when its holders exit,
    # the file with the last holder's pid stays, as lock files do.
    allowed = {"out", "out/run.yaml", "out/.lock", "store"}
    written = [name for name in files_under(folder / "out") + files_under(folder / "store") if name not in allowed]
    check(case, result.returncode, result.stderr, written + outcome["s3_written"])
    assert result.returncode == case.input[1], result.stderr[-2000:]
    assert not exitcodes.is_retryable(result.returncode)
    assert s3_server.secret_key not in result.stdout + result.stderr


def failure(call) -> BaseException:
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the trainer maps every failure to an exit code
        return error
    raise AssertionError("accepted")


IN_PROCESS = cases("trainer", [
    ("data-image-missing", lambda folder: load_examples(RunSpec.model_validate(
        BASE | {"data": {"path": str(images_jsonl(folder, missing=5)), "subsetSize": None}})),
     ("test.jsonl: record 5 (id 5)", "5.png"), "fix image_path or add a data.pathMap OLD=NEW rewrite"),
    # Refused at start from the image's stat: a FIFO would block the trainer's open for ever.
    ("data-image-is-a-fifo", lambda folder: examples_of(one_record(folder, "pipe.png", make=os.mkfifo)),
     ("test.jsonl: record 0 (id 0)", "pipe.png", "FIFO"), "point image_path at an image file"),
    # Refused at start, as data (exit 3, the record named), not by the processor at the first step (exit 2).
    ("data-image-extreme-aspect-ratio", lambda folder: examples_of(
        one_record(folder, "thin.png", make=lambda path: Image.new("RGB", (1000, 4)).save(path))),
     ("test.jsonl: record 0 (id 0)", "thin.png", "1000x4"), "crop or pad it"),
    ("data-two-image-placeholders", lambda folder: examples_of(one_record(folder, "0.png", "<image><image>" + PROMPT)),
     ("test.jsonl: record 0 (id 0)", "3 <image> placeholders"), "keep one"),
    ("model-wrong-architecture", lambda folder: load_model_folder(model_folder(folder, write={"config.json": BERT})),
     ("model.path", "model_type 'bert'", "not an image-text-to-text architecture"), MODEL_FIX),
    ("model-without-processor-files", lambda folder: load_model_folder(
        model_folder(folder, keep=("config.json", "model.safetensors"))),
     ("model.path", "preprocessor_config.json"), MODEL_FIX),
    ("model-without-tokenizer", lambda folder: load_model_folder(model_folder(folder, keep=ALL_BUT_TOKENIZER)),
     ("model.path", "tokenizer has no <|image_pad|> token"), MODEL_FIX),
    ("model-config-without-model-type", lambda folder: load_model_folder(
        model_folder(folder, keep=ALL_BUT_CONFIG, write={"config.json": json.dumps({"hidden_size": 8})})),
     ("model.path", "model_type"), MODEL_FIX),
    ("model-config-not-json", lambda folder: load_model_folder(
        model_folder(folder, keep=ALL_BUT_CONFIG, write={"config.json": '{"model_type": '})),
     ("model.path", "config.json"), MODEL_FIX),
])


def load_model_folder(path: Path):
    spec = RunSpec.model_validate(BASE | {"model": {"path": str(path)}})
    # fails while the processor loads, before the learner, the store or the world are touched
    return load_learner_and_engine(spec, str(path), None, None, [], None)


@pytest.mark.timeout(120)  # a case that opens a FIFO blocks: it fails here instead of at the suite's 600 s
@pytest.mark.parametrize("case", IN_PROCESS)
def test_trainer_stops_before_any_work_with_its_permanent_code(case: Case, tmp_path):
    error = failure(lambda: case.input(tmp_path))
    code = exit_code_for(error)
    check(case, code, str(error))
    assert code in (exitcodes.BAD_DATA, exitcodes.BAD_MODEL), f"{type(error).__name__} maps to {code}"


def test_a_failed_trainers_message_reaches_the_run_status_without_the_secret(trainers, s3_server):
    """The trainer pod leaves its log's tail as termination message (FallbackToLogsOnError: the last 2048 bytes);
    the operator copies it into the AdaptationRun's status and events."""
    outcome = trainers["store-wrong-credentials"]
    result = outcome["result"]
    experiment = ExperimentSpec.model_validate({"storage": {"uri": "s3://ttrv-test/x"},
                                                "datasets": [{"name": "shapes", "path": "ttrv://tiny-shapes/test"}]})
    run = adaptation_run({"name": "exp", "namespace": NS}, experiment, "shapes") | {"status": {"phase": "Running"}}
    children = {child["kind"]: child for child in desired_children(run, False) if child["kind"] != "PyTorchJob"}
    plan = decide_run(Observed(run, NOW, children | {"PyTorchJob": job(run, failed())},
                               pods=[pod(result.returncode, result.stderr[-2048:])]))
    assert (plan.status["phase"], plan.status["exitCode"]) == ("Failed", exitcodes.BAD_SPEC)
    assert "refused the credentials" in plan.status["message"]
    reported = json.dumps(plan.status) + repr(plan.events)
    assert CREDENTIAL not in reported and s3_server.secret_key not in reported
