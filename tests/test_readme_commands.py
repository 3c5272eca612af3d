"""Every command of README.md and docs/*.md runs here, as a reader would type it.

Each fenced block carries its language: `bash` (commands), `console` (`$ command` lines and their output), `text`
(output, diagrams, a usage synopsis) or `yaml`. Every command of a `bash` or `console` block is run by a test of
this module, or the block is marked `<!-- not-run: why -->` on the line above it (a cluster, a GPU); a block added
without either fails `test_every_command_block_is_run_or_marked`.

The commands run verbatim with bash, in a scratch folder that links the repository's files (so `runs/...` is written
there, never into the checkout), with this checkout's `ttrv` first on PATH and its packages on PYTHONPATH. A command
must not leave a process running. Adaptation runs are shortened by the
override the README documents: `TTRV_SET` (ttrv/cli.py, `overrides`), which `ttrv run` and `ttrv experiment run`
apply on top of the spec file. `my-spec.yaml` and `test.json`, the README's stand-ins for a reader's own files, are a
copy of examples/tiny.yaml and eight records of the bundled benchmark; a `yaml` block whose first line is
`# NAME.yaml...` is written to NAME.yaml. The `kubectl` transcripts are run by `docs/operator_demo.py` (the real
kubectl against the tests' API stand-in, as docs/operator.md says); their shown output is compared with what it
prints, ages, times and uids aside. Runs are started once each, and the checks that read their output share them.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ttrv.benchmark import materialize
from ttrv.cli import build_parser, with_overrides
from ttrv.spec import ExperimentSpec, SpecError, load_experiment, load_run_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LANGUAGES = {"bash", "console", "text", "yaml"}
NOT_RUN = re.compile(r"<!-- not-run: (.+?) -->")
# A `text` block with a line that starts like one of these is a command block mislabelled (a `ttrv` usage line is
# checked against the parser instead).
COMMAND_WORDS = ("ttrv ", "kubectl ", "helm ", "make ", "python ", "docker ", "bash ", "PYTHONPATH=", "$ ")

# The documented override (README, "Run on one machine"): a README run takes 2 steps of 8 prompts and evaluates 16
# prompts per split; the tiny-shapes experiment 4 steps a run.
SMOKE_RUN = "data.subsetSize=16 grpo.epochs=1 eval.limit=16 eval.majVotes=4"
SMOKE_EXPERIMENT = "grpo.epochs=1 eval.limit=16"


@dataclass(frozen=True)
class Run:
    smoke: str = ""  # TTRV_SET
    exit_code: int = 0
    timeout: float = 240.0


# Every runnable command of the docs but the kubectl transcripts, with the override it runs under.
RUNS = {
    "ttrv run examples/tiny.yaml --out runs/demo": Run(SMOKE_RUN),
    "ttrv run examples/tiny-service.yaml --out runs/svc": Run(SMOKE_RUN, timeout=420),
    "ttrv run my-spec.yaml --nproc 2": Run(SMOKE_RUN),
    "ttrv data check test.json --path-map /authors/imgs=imgs": Run(),
    "ttrv spec validate my-spec.yaml": Run(),
    "ttrv plan my-spec.yaml": Run(),
    "ttrv render examples/experiment-one-gpu.yaml": Run(),
    "ttrv render examples/experiment-sixteen-kueue.yaml": Run(),
    "ttrv experiment run examples/experiment-tiny-shapes.yaml --local --out runs/tiny-shapes":
        Run(SMOKE_EXPERIMENT, timeout=540),
    "ttrv experiment run fail.yaml --local --out out2": Run(exit_code=1),
}
DEMO = "PYTHONPATH=. python docs/operator_demo.py"  # named in docs/operator.md; prints `$ kubectl ...` and output


# ------------------------------------------------------------------------------------------------ the blocks
@dataclass(frozen=True)
class Block:
    file: str
    line: int  # of the opening fence, 1-based
    language: str
    text: str
    not_run: str | None  # the reason of a `<!-- not-run: ... -->` line right above it

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"

    def commands(self) -> list[str]:
        """A `bash` block's logical lines (continuations joined, comments dropped), a `console` block's `$` lines."""
        if self.language == "console":
            return [line[2:] for line in self.text.splitlines() if line.startswith("$ ")]
        if self.language != "bash":
            return []
        joined = re.sub(r"\\\n\s*", " ", self.text)
        return [line for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]

    def output(self) -> list[str]:
        """A `console` block's lines that are not commands."""
        return [line for line in self.text.splitlines() if not line.startswith("$ ")]


def read_blocks() -> list[Block]:
    found = []
    for path in DOCS:
        lines = path.read_text().splitlines()
        index = 0
        while index < len(lines):
            fence = re.fullmatch(r"```(\S*)", lines[index])
            if fence is None:
                index += 1
                continue
            end = next(i for i in range(index + 1, len(lines)) if lines[i] == "```")
            marker = NOT_RUN.fullmatch(lines[index - 1].strip()) if index else None
            found.append(Block(str(path.relative_to(ROOT)), index + 1, fence.group(1),
                               "\n".join(lines[index + 1 : end]) + "\n", marker.group(1) if marker else None))
            index = end + 1
    return found


BLOCKS = read_blocks()


def key(command: str) -> str:
    """A command as RUNS names it: without its trailing comment, spaces collapsed."""
    return " ".join(re.sub(r"\s+#\s.*$", "", command).split())


def runnable() -> dict[str, Block]:
    return {key(c): b for b in BLOCKS if b.not_run is None for c in b.commands()}


def block_of(command: str) -> Block:
    return runnable()[command]


@pytest.mark.pure
def test_every_block_names_its_language():
    unlabelled = [f"{b} ```{b.language}" for b in BLOCKS if b.language not in LANGUAGES]
    assert not unlabelled, f"label each block with one of {sorted(LANGUAGES)}: {unlabelled}"


@pytest.mark.pure
def test_every_command_block_is_run_or_marked():
    """A new command has to be added to RUNS (or be a kubectl transcript that the demo prints), or its block has to
    say why it cannot run here."""
    missing = [f"{block}: {command}" for command, block in runnable().items()
               if command not in RUNS and not (block.language == "console" and command.startswith("kubectl "))]
    assert not missing, "run these in tests/test_readme_commands.py (RUNS) or mark their block " \
                        f"`<!-- not-run: why -->`: {missing}"
    assert all(b.not_run.strip() for b in BLOCKS if b.not_run is not None)
    stale = sorted(set(RUNS) - set(runnable()))
    assert not stale, f"RUNS names commands that no runnable block of the docs has: {stale}"


@pytest.mark.pure
def test_no_text_block_is_a_command():
    for block in BLOCKS:
        if block.language != "text":
            continue
        for line in block.text.splitlines():
            if line.startswith("ttrv "):
                assert_synopsis(line, block)
            else:
                assert not line.startswith(COMMAND_WORDS), f"{block} holds a command: label it bash or console"


def assert_synopsis(line: str, block: Block) -> None:
    """A usage line (`ttrv experiment run FILE --local [--out DIR]`) names commands and options that exist."""
    parser = build_parser()
    words = line.replace("[", " ").replace("]", " ").split()[1:]
    while words:
        subcommands = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if subcommands is None or words[0] not in subcommands.choices:
            break
        parser = subcommands.choices[words.pop(0)]
    options = [w for w in words if w.startswith("-")]
    assert options, f"{block}: not a ttrv usage line: {line}"
    unknown = [o for o in options if o not in parser._option_string_actions]
    assert not unknown, f"{block}: `{parser.prog}` has no option {unknown}"


@pytest.mark.pure
def test_yaml_blocks_parse_and_experiments_validate():
    for block in (b for b in BLOCKS if b.language == "yaml"):
        document = yaml.safe_load(block.text)
        if isinstance(document, dict) and document.get("kind") == "Experiment":
            parse_spec(document["spec"], ExperimentSpec, str(block))
        elif isinstance(document, dict) and "datasets" in document:
            parse_spec(document, ExperimentSpec, str(block))


@pytest.mark.pure
def test_the_readme_documents_the_override_this_module_uses():
    readme = " ".join((ROOT / "README.md").read_text().split())
    for smoke in (SMOKE_RUN, SMOKE_EXPERIMENT):
        assert f'TTRV_SET="{smoke}"' in readme


@pytest.mark.pure
def test_make_demo_is_the_readme_run():
    """`make demo`'s block is marked not-run: its recipe is one of the runs here."""
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].splitlines()[1].strip()
    assert recipe.removeprefix("$(BIN)/") in RUNS


# ------------------------------------------------------------------------------------------- running them
@dataclass
class Result:
    command: str
    returncode: int
    stdout: str
    stderr: str
    seconds: float
    left_running: dict[int, str]

    def __str__(self) -> str:
        return (f"`{self.command}` exited {self.returncode} after {self.seconds:.0f} s; left running: "
                f"{self.left_running}\n--- stdout (tail)\n{self.stdout[-2500:]}\n--- stderr (tail)\n"
                f"{self.stderr[-5000:]}")


def processes_in(folder: Path) -> dict[int, str]:
    """This machine's processes whose working directory lies in `folder`: the ones the commands started."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone, or another user's
            continue
        if (cwd == str(folder) or cwd.startswith(f"{folder}/")) and command:
            found[int(entry.name)] = command[:200]
    return found


def stop_leftovers(folder: Path, grace: float) -> dict[int, str]:
    """Processes still running in `folder` after `grace` seconds, killed (a test must not leave any behind)."""
    deadline = time.monotonic() + grace
    while (left := processes_in(folder)) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


class Scratch:
    """A folder that stands for the checkout: the repository's files linked, the placeholders written, and each
    command run once in it."""

    def __init__(self, folder: Path, logs: Path):
        self.folder, self.logs = folder, logs
        ignored = {line.strip().strip("/") for line in (ROOT / ".gitignore").read_text().splitlines()}
        # The packages are imported from PYTHONPATH (the checkout itself), so their files keep their real paths.
        for entry in ROOT.iterdir():
            if entry.name not in ignored | {".git", "ttrv", "operators"}:
                (folder / entry.name).symlink_to(entry)
        shutil.copy(ROOT / "examples" / "tiny.yaml", folder / "my-spec.yaml")
        self.write_test_json()
        for block in BLOCKS:
            named = re.match(r"# ([\w.-]+\.yaml)\b", block.text) if block.language == "yaml" else None
            if named:
                (folder / named.group(1)).write_text(block.text)
        self.results: dict[str, Result] = {}

    def write_test_json(self) -> None:
        """Eight records of the bundled benchmark as the reference's files look: absolute image paths elsewhere."""
        split = materialize()
        (self.folder / "imgs").mkdir()
        records = json.loads((split / "test.json").read_text())[:8]
        for record in records:
            name = Path(record["image_path"]).name
            shutil.copy(split / record["image_path"], self.folder / "imgs" / name)
            record["image_path"] = f"/authors/imgs/{name}"
        (self.folder / "test.json").write_text(json.dumps(records))

    def run(self, command: str) -> Result:
        if command not in self.results:
            self.results[command] = self._run(command, RUNS[command] if command in RUNS else Run())
        return self.results[command]

    def _run(self, command: str, how: Run) -> Result:
        env = {name: value for name, value in os.environ.items() if name != "TTRV_SET"}
        env |= {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])),
                "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
                "TTRV_LOG_FORMAT": "json"}  # the checks read the logs' events, as from a pipe
        if how.smoke:
            env["TTRV_SET"] = how.smoke
        started = time.monotonic()
        # Output goes to files, not pipes: a child left running would hold a pipe open, and reading it would wait
        # for that child rather than for the command.
        logs, note = self.logs / f"{len(self.results)}", ""
        with open(f"{logs}.out", "w") as stdout, open(f"{logs}.err", "w") as stderr:
            process = subprocess.Popen(["bash", "-c", command], cwd=self.folder, env=env, stdout=stdout,
                                       stderr=stderr, start_new_session=True)
            try:
                process.wait(timeout=how.timeout)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                note = f"\n[test: killed after the {how.timeout:.0f} s budget]"
        seconds = time.monotonic() - started
        left = stop_leftovers(self.folder, 10.0)
        return Result(command, process.returncode, Path(f"{logs}.out").read_text(errors="replace"),
                      Path(f"{logs}.err").read_text(errors="replace") + note, seconds, left)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    folder = tmp_path_factory.mktemp("readme").resolve()
    yield Scratch(folder, tmp_path_factory.mktemp("readme-logs"))
    stop_leftovers(folder, 0.0)


def squeeze(line: str) -> str:
    return " ".join(line.split())


CHECKS = {}


def check(command: str):
    def register(function):
        CHECKS[command] = function
        return function
    return register


@pytest.mark.pure
def test_runs_have_checks_for_commands_that_exist():
    assert set(CHECKS) <= set(RUNS)


@pytest.mark.parametrize("command", [pytest.param(c, marks=pytest.mark.timeout(RUNS[c].timeout + 120), id=c)
                                     for c in RUNS])
def test_command(scratch, command):
    result = scratch.run(command)
    assert result.returncode == RUNS[command].exit_code, str(result)
    assert not result.left_running, str(result)
    block = block_of(command)
    if block.language == "console":  # the transcript's tables have the columns it shows, its last line is printed
        shown = [line for line in block.output() if line.startswith(("NAME ", "status: "))]
        assert shown and all(squeeze(line) in map(squeeze, result.stdout.splitlines()) for line in shown), str(result)
    if command in CHECKS:
        CHECKS[command](scratch.folder, result)


def spec_of(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


@check("ttrv run examples/tiny.yaml --out runs/demo")
def _demo(folder: Path, result: Result):
    # the README: "`make demo` prints where its report is: `runs/demo/report.json` and `runs/demo/report.png`"
    assert "report: runs/demo/report.json and runs/demo/report.png" in result.stdout
    for name in ("events.jsonl", "report.json", "report.png"):
        assert (folder / "runs/demo" / name).is_file(), name
    resolved = spec_of(folder / "runs/demo/run.yaml")
    assert (resolved["grpo"]["epochs"], resolved["data"]["subsetSize"]) == (1, 16)  # the override took effect
    assert len((folder / "runs/demo/events.jsonl").read_text().splitlines()) >= 2


@check("ttrv run examples/tiny-service.yaml --out runs/svc")
def _service(folder: Path, result: Result):
    assert (folder / "runs/svc/report.json").is_file()
    assert spec_of(folder / "runs/svc/run.yaml")["storage"]["uri"].startswith("s3://")  # the embedded S3 store
    served = [json.loads(line) for line in (folder / "runs/svc/rollout.log").read_text().splitlines()
              if '"serve_listening"' in line]
    # `rollout.engine: auto` takes vLLM where `make test` (make vllm) built .venv-vllm
    engine = "vllm" if (ROOT / ".venv-vllm" / "bin" / "python").exists() else "hf"
    assert served and {s["engine"] for s in served} == {engine}, served


@check("ttrv run my-spec.yaml --nproc 2")
def _two_processes(folder: Path, result: Result):
    assert (folder / "runs/latest/report.json").is_file()
    # Several ranks and a progress bar share stderr: an event may follow a bar's text on its line.
    ready = [json.loads(line[line.index("{"):]) for line in result.stderr.splitlines() if '"learner_ready"' in line]
    assert ready and {r["world"] for r in ready} == {2}, ready


@check("ttrv data check test.json --path-map /authors/imgs=imgs")
def _data_check(folder: Path, result: Result):
    summary = json.loads(result.stdout)
    assert (summary["records"], summary["with_image"], summary["problems"]) == (8, 8, 0), summary
    assert summary["option_letters"] == ["A", "B", "C", "D"]


@check("ttrv spec validate my-spec.yaml")
def _validate(folder: Path, result: Result):
    assert json.loads(result.stdout) == load_run_spec(ROOT / "examples/tiny.yaml").model_dump(mode="json")


@check("ttrv render examples/experiment-one-gpu.yaml")
def _render_one(folder: Path, result: Result):
    kinds = [o["kind"] for o in yaml.safe_load_all(result.stdout)]
    assert {"AdaptationRun", "ConfigMap", "TrainJob"} <= set(kinds), kinds  # the example asks trainerApi: trainjob


@check("ttrv render examples/experiment-sixteen-kueue.yaml")
def _render_sixteen(folder: Path, result: Result):
    kinds = [o["kind"] for o in yaml.safe_load_all(result.stdout)]
    assert kinds.count("AdaptationRun") == 16, kinds


TINY_SHAPES = "ttrv experiment run examples/experiment-tiny-shapes.yaml --local --out runs/tiny-shapes"


@check(TINY_SHAPES)
def _tiny_shapes(folder: Path, result: Result):
    status = json.loads((folder / "runs/tiny-shapes/status.json").read_text())["experiment"]["status"]
    assert (status["phase"], status["datasetsDone"], status["datasetsTotal"]) == ("Succeeded", 3, 3), status
    mounted = spec_of(folder / "runs/tiny-shapes/tiny-shapes-seed-1/tiny-shapes-seed-1-spec/run.yaml")
    assert (mounted["grpo"]["epochs"], mounted["eval"]["limit"]) == (1, 16)  # the override reached the pods


@check("ttrv experiment run fail.yaml --local --out out2")
def _fail(folder: Path, result: Result):
    status = json.loads((folder / "out2/status.json").read_text())["experiment"]["status"]
    assert (status["phase"], status["datasetsFailed"]) == ("PartiallySucceeded", 1), status
    assert "fail-missing failed: trainer failed with exit code 3 (bad data)" in result.stdout


def text_block(file: str, first_line: str) -> Block:
    (block,) = [b for b in BLOCKS if b.file == file and b.language == "text" and b.text.startswith(first_line)]
    return block


@pytest.mark.timeout(RUNS[TINY_SHAPES].timeout + 120)  # when it runs the experiment itself (-k)
def test_the_local_experiment_leaves_what_docs_local_lists(scratch):
    """docs/local.md's tree of `runs/tiny-shapes/`, read from the run above."""
    result = scratch.run(TINY_SHAPES)
    assert result.returncode == 0, str(result)
    stack: list[tuple[int, Path]] = []
    listed = []
    for line in text_block("docs/local.md", "runs/tiny-shapes/").text.splitlines():
        name = line.strip().split("  ")[0]
        if not name or name == "...":
            continue
        depth = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= depth:
            stack.pop()
        path = (stack[-1][1] if stack else scratch.folder) / name
        stack.append((depth, path))
        listed.append(path)
    missing = [str(p.relative_to(scratch.folder)) for p in listed if not p.exists()]
    assert len(listed) > 5 and not missing, missing


@pytest.mark.timeout(RUNS[TINY_SHAPES].timeout + 120)
def test_the_events_docs_local_shows_are_posted(scratch):
    """docs/local.md's Kubernetes Events of the run above, numbers aside."""
    result = scratch.run(TINY_SHAPES)
    assert result.returncode == 0, str(result)

    def event(record: dict) -> tuple:
        return record["kind"], record["name"], record["reason"], re.sub(r"\d+\.\d+", "#", record["message"])

    posted = {event(json.loads(line[line.index("{"):])) for line in result.stderr.splitlines()
              if '"event_posted"' in line}
    shown = [event(json.loads(line.replace(", ...}", "}")))
             for line in text_block("docs/local.md", '{"kind"').text.splitlines() if line.startswith("{")]
    assert len(shown) > 3 and set(shown) <= posted, set(shown) - posted


# ----------------------------------------------------------------------------- the kubectl transcripts
def normalise(line: str) -> str:
    """A kubectl line without what changes from run to run: ages, times, uids."""
    line = re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", "<time>", line)
    line = re.sub(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", "<uid>", line)
    line = re.sub(r"\b(\d+[hm])*\d+s\b", "<age>", line)
    return squeeze(line)


def test_kubectl_transcripts_are_what_the_demo_prints(scratch):
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not on PATH: docs/operator_demo.py reads the stand-in with the real kubectl")
    assert DEMO in (ROOT / "docs/operator.md").read_text()
    result = scratch.run(DEMO)
    assert result.returncode == 0, str(result)
    printed: dict[str, list[str]] = {}
    for part in result.stdout.split("$ ")[1:]:
        command, _, output = part.partition("\n")
        printed[command] = [normalise(line) for line in output.splitlines()]
    transcripts = [b for b in BLOCKS if b.language == "console" and b.not_run is None
                   and b.text.startswith("$ kubectl ")]
    assert len(transcripts) >= 4
    for block in transcripts:
        command = None
        for line in block.text.splitlines():
            if line.startswith("$ "):
                command = line[2:]
                assert command in printed, f"{block}: the demo does not run `{command}`; it runs {list(printed)}"
            elif line.strip() and not line.strip().startswith("... ("):  # an elision of the docs
                assert normalise(line) in printed[command], f"{block}: `{command}` does not print {line!r}"


# ------------------------------------------------------------------------------------------ the override
@pytest.mark.pure
def test_set_overrides_a_field_as_the_yaml_spells_it_and_validates_the_result():
    spec = load_run_spec(ROOT / "examples/tiny.yaml")
    changed = with_overrides(spec, SMOKE_RUN.split() + ["grpo.micro_batch_size=8", "model.lora.rank=4"])
    assert (changed.data.subset_size, changed.grpo.epochs, changed.eval.limit, changed.eval.maj_votes) == \
        (16, 1, 16, 4)
    assert (changed.grpo.micro_batch_size, changed.model.lora.rank) == (8, 4)
    assert changed.grpo.lr == spec.grpo.lr and with_overrides(spec, []) is spec
    _, experiment = load_experiment(ROOT / "examples/experiment-tiny-shapes.yaml")
    assert with_overrides(experiment, ["datasets.2.subsetSize=4"]).datasets[2].subset_size == 4
    for item, message in [("grpo.epoch=1", "grpo.epoch: unknown key"),
                          ("grpo.epochs=0", "grpo.epochs: Input should be greater than 0"),
                          ("rollout.groupSize=64", "groupSize"),
                          ("seed.x=1", "seed is a value, not a mapping"),
                          ("grpo.epochs", "expected KEY=VALUE"),
                          ("datasets.3.subsetSize=4", "datasets.3: the list has 3 entries")]:
        with pytest.raises(SpecError, match=re.escape(message)):
            with_overrides(experiment if item.startswith("datasets") else spec, [item])


def test_a_bad_override_stops_ttrv_run_before_it_writes_anything(tmp_path):
    env = os.environ | {"PYTHONPATH": str(ROOT), "TTRV_SET": "grpo.epochs=1"}
    result = subprocess.run([sys.executable, "-m", "ttrv.cli", "run", str(ROOT / "examples/tiny.yaml"), "--out",
                             str(tmp_path / "out"), "--set", "eval.limits=8"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert "error: --set grpo.epochs=1 eval.limits=8: eval.limits: unknown key" in result.stderr
    assert not (tmp_path / "out").exists()
