"""`ttrv`: the command line. Each subcommand is a small function; errors exit non-zero with a message that names
the field or file and the fix, never a traceback.

Commands that live outside this package plug in through the entry-point group `ttrv.commands` (pyproject.toml):
`ttrv experiment` runs the operator's reconcile loop, so it lives in operators/local/command.py, and ttrv never
imports operators."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import entry_points
from pathlib import Path

import yaml
from pydantic.alias_generators import to_camel

from ttrv import exitcodes, log
from ttrv.data import DataError, check_dataset, read_dataset
from ttrv.fsutil import strict_json
from ttrv.lifetime import RunFolderError, check_writable
from ttrv.spec import ExperimentSpec, RunSpec, SpecError, load_experiment, load_run_spec, parse_spec

EXIT_USAGE = 2
SET_HELP = ("override a spec field, e.g. --set grpo.epochs=1 (repeatable; dotted path, YAML value; "
            "$TTRV_SET holds more, separated by spaces)")


MAX_PROCESSES = 256
"""As resources.processesPerNode (ttrv/spec/run.py): each process loads the model."""


def count_argument(limit: int):
    """An argparse type: a whole number from 1 to `limit` (argparse then names the option and exits 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a whole number; write 1 to {limit}") from None
        if not 1 <= value <= limit:
            raise argparse.ArgumentTypeError(f"{value} is out of range; write 1 to {limit}")
        return value
    return parse


def port_argument(text: str) -> int:
    """An argparse type: a TCP port, 1 to 65535 (0 would let the kernel pick one no client knows)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text[:40]!r} is not a port number; write 1 to 65535") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is out of range; write a port from 1 to 65535")
    return value


def check_listen(host: str, port: int) -> None:
    """Refuses, before the model loads, an address this process cannot listen on: a port in use, a host that is
    not an address of this machine or cannot be resolved. (Free now is all it proves: another process may take
    the port before the server binds it, and that bind's error is reported as well.)"""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, ValueError) as error:
        raise SpecError(f"--host {host!r}: not an address to listen on ({error}); use 127.0.0.1, or 0.0.0.0 in a "
                        "pod") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        # SO_REUSEADDR as every server sets it (http.server, uvicorn): a port in TIME_WAIT is not "in use".
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as error:
            raise SpecError(listen_error(host, port, error)) from None


def listen_error(host: str, port: int, error: OSError) -> str:
    import errno

    hint = {errno.EADDRINUSE: "another process listens there; stop it or choose another --port",
            errno.EACCES: "ports below 1024 need privileges; choose a port from 1024 up",
            errno.EADDRNOTAVAIL: "the host is not an address of this machine; use 127.0.0.1, or 0.0.0.0 in a pod",
            }.get(error.errno, "choose another --host or --port")
    return f"--host {host} --port {port}: cannot listen ({error.strerror or error}); {hint}"


def cmd_data_check(args: argparse.Namespace) -> int:
    """Exits 3 (exitcodes.BAD_DATA, what the trainer exits with on the same file) when the file has a problem."""
    try:
        dataset = read_dataset(args.file, args.format, args.path_map)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return exitcodes.BAD_DATA
    problems = check_dataset(dataset, args.choices, open_images=not args.no_images)
    letters = sorted({letter for p in dataset.prompts for letter in p.options})
    answers = sorted({e.answer for e in dataset.examples if e.answer is not None})
    summary = {
        "file": str(dataset.path),
        "format": dataset.format,
        "records": len(dataset.examples),
        "option_letters": letters,
        "answers": answers,
        "with_image": sum(p.image_path is not None for p in dataset.prompts),
        "problems": len(problems),
    }
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    print(strict_json(summary))
    return exitcodes.BAD_DATA if problems else 0


def cmd_spec_schema(args: argparse.Namespace) -> int:
    model = {"run": RunSpec, "experiment": ExperimentSpec}[args.kind]
    print(json.dumps(model.model_json_schema(), indent=2))
    return 0


def cmd_spec_validate(args: argparse.Namespace) -> int:
    """The spec with every default, as JSON on stdout; the memory plan (`ttrv plan`) on stderr, or why there is
    none (a model whose config is not on this machine), so that stdout stays one JSON document."""
    from ttrv.plan import PlanError, load_config, plan

    if args.kind == "run":
        spec = load_run_spec(args.file)
    else:
        _, spec = load_experiment(args.file)
    print(json.dumps(spec.model_dump(mode="json")))
    try:
        config = load_config(spec.model.path, local_only=True)  # validating never waits on the network
        print(f"memory plan (`ttrv plan`):\n{plan(spec, config).table()}", file=sys.stderr)
    except PlanError as error:
        print(f"memory plan: none: {error}", file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    """The memory budget of one trainer GPU (and one rollout GPU) for the spec's model and hardware: 0 when it fits,
    1 when it does not (with the fixes), 2 when the spec or the model's config cannot be read."""
    from ttrv.plan import PlanError, load_config, plan

    if args.kind == "run":
        spec = with_overrides(load_run_spec(args.spec), overrides(args))
    else:
        _, spec = load_experiment(args.spec)
        spec = with_overrides(spec, overrides(args))
    try:
        result = plan(spec, load_config(spec.model.path, args.model_config), colocated=args.colocated)
    except PlanError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(result.to_dict()) if args.json else result.table())
    return 0 if result.fits else 1


def cmd_spec_crds(args: argparse.Namespace) -> int:
    from ttrv.crds import crds

    if args.out is None:
        print(yaml.safe_dump_all(list(crds().values()), sort_keys=True), end="")
        return 0
    out = Path(args.out)
    check_writable(out, "--out")
    for name, crd in crds().items():
        (out / name).write_text(yaml.safe_dump(crd, sort_keys=True))
    return 0


def cmd_spec_values_schema(args: argparse.Namespace) -> int:
    from ttrv.crds import values_schema_json

    print(values_schema_json(), end="")
    return 0


def overrides(args: argparse.Namespace) -> list[str]:
    """The KEY=VALUE spec overrides of `ttrv run` and `ttrv experiment run`: those of $TTRV_SET (separated by
    whitespace), then each `--set`; a later one wins. The environment variable lets a script shorten commands it
    runs verbatim (tests/test_readme_commands.py runs the README's that way)."""
    return os.environ.get("TTRV_SET", "").split() + (getattr(args, "set", None) or [])


def with_overrides(spec, items: list[str]):
    """`spec` with each KEY=VALUE of `items` applied: KEY a dotted field path as in the YAML (camelCase or
    snake_case, a list index as a number: `datasets.0.subsetSize`), VALUE read as YAML. The result is validated
    like a spec file, so a misspelt field or an impossible value is named with the fix."""
    if not items:
        return spec
    document = spec.model_dump(mode="json")
    for item in items:
        key, sep, raw = item.partition("=")
        parts = key.split(".")
        if not sep or not all(parts):
            raise SpecError(f"--set {item!r}: expected KEY=VALUE with a dotted field path, e.g. grpo.epochs=1")
        target = document
        for depth, part in enumerate(parts):
            where = ".".join(parts[: depth + 1])
            if isinstance(target, list):
                if not part.isdigit() or int(part) >= len(target):
                    raise SpecError(f"--set {item!r}: {where}: the list has {len(target)} entries; use an index "
                                    f"from 0 to {len(target) - 1}")
                part = int(part)
            elif isinstance(target, dict):
                part = to_camel(part)
            else:
                raise SpecError(f"--set {item!r}: {where}: {'.'.join(parts[:depth])} is a value, not a mapping; "
                                "set it whole or check the path (`ttrv spec schema` lists every field)")
            if depth == len(parts) - 1:
                try:
                    target[part] = yaml.safe_load(raw)
                except (yaml.YAMLError, ValueError) as error:  # ValueError: an integer over the int-str limit
                    raise SpecError(f"--set {item[:80]!r}: the value is not readable YAML ({str(error)[:120]}); "
                                    "quote text, write numbers of a sensible size") from None
            else:
                if isinstance(target, dict) and target.get(part) is None:
                    target[part] = {}  # an unset optional section, e.g. model.lora
                target = target[part]
    return parse_spec(document, type(spec), f"--set {' '.join(items)}")


def experiment_of(args: argparse.Namespace) -> tuple[dict, ExperimentSpec]:
    """The Experiment of `args.file`, in the namespace `--namespace` names, if it names one."""
    metadata, spec = load_experiment(args.file)
    return dict(metadata) | ({"namespace": args.namespace} if args.namespace else {}), spec


@contextmanager
def naming_file(path: str) -> Iterator[None]:
    """A problem found in the Experiment after loading it still names its file."""
    try:
        yield
    except SpecError as error:
        raise SpecError(f"{path}: {error}") from None


def cmd_render(args: argparse.Namespace) -> int:
    from ttrv.manifests import experiment_objects

    metadata, spec = experiment_of(args)
    with naming_file(args.file):
        objects = experiment_objects(metadata, spec, args.trainer_api)
    print(yaml.safe_dump_all(objects, sort_keys=False), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from ttrv.local import run_local

    spec = with_overrides(load_run_spec(args.spec), overrides(args))
    code = run_local(spec, Path(args.out), args.nproc, args.embedded_s3)
    report = Path(args.out) / "report.json"
    if code == 0 and report.exists():
        print(f"report: {report} and {report.with_suffix('.png')}")
    return code


def cmd_serve(args: argparse.Namespace) -> int:
    from ttrv.rollout.service import serve
    from ttrv.rollout.vllm_process import VLLMError
    from ttrv.store import StoreError

    spec = load_run_spec(args.spec)
    build_service = None
    if args.shared:
        from ttrv.rollout.shared import load_shared, shared_service
        from ttrv.weights import resolve_model

        shared = load_shared(args.shared, spec)

        def build_service(work, limits):
            return shared_service(spec, shared, resolve_model(spec.model.path), work, limits)
    check_listen(args.host, args.port)
    try:
        return serve(spec, args.host, args.port, build_service=build_service)
    except (StoreError, VLLMError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # the port was taken between the check and the server's bind
        if getattr(error, "errno", None) is None:
            raise
        print(f"error: {listen_error(args.host, args.port, error)}", file=sys.stderr)
        return 1


def cmd_train(args: argparse.Namespace) -> int:
    from ttrv.launch import launch

    return launch(["--spec", args.spec, "--out", args.out], args.nproc_per_node, args.standalone)


def cmd_spec_docs(args: argparse.Namespace) -> int:
    from ttrv.docs import fields_table

    print(fields_table())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ttrv", description="Test-time reinforcement learning for VLMs.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = commands.add_parser("data", help="inspect test-set files").add_subparsers(dest="data_command", required=True)
    check = data.add_parser("check", help="count records and report every problem of a data file")
    check.add_argument("file", help="reference JSON, verl parquet or JSONL file")
    check.add_argument("--format", default="auto", choices=["auto", "reference_json", "verl_parquet", "jsonl"])
    check.add_argument("--path-map", action="append", default=[], metavar="OLD=NEW",
                       help="rewrite image path prefixes (repeatable)")
    check.add_argument("--choices", default="ABCD", help="option letters of prompts that list no option lines "
                       "(reward.choices); a prompt's own \"A. ...\" lines are its options")
    check.add_argument("--no-images", action="store_true", help="do not open the images")
    check.set_defaults(handler=cmd_data_check)

    spec = commands.add_parser("spec", help="run and experiment specs").add_subparsers(dest="spec_command", required=True)
    schema = spec.add_parser("schema", help="print the JSON schema of a spec")
    schema.add_argument("kind", choices=["run", "experiment"], nargs="?", default="run")
    schema.set_defaults(handler=cmd_spec_schema)
    validate = spec.add_parser("validate", help="validate a spec file and print it with every default filled in")
    validate.add_argument("file")
    validate.add_argument("--kind", choices=["run", "experiment"], default="run")
    validate.set_defaults(handler=cmd_spec_validate)
    crds = spec.add_parser("crds", help="print (or write) the CustomResourceDefinitions generated from the specs")
    crds.add_argument("--out", metavar="DIR", help="write one file per CRD into DIR instead of printing them")
    crds.set_defaults(handler=cmd_spec_crds)
    values_schema = spec.add_parser("values-schema", help="print the ttrv chart's values.schema.json")
    values_schema.set_defaults(handler=cmd_spec_values_schema)

    render = commands.add_parser(
        "render", help="print every object the controller creates for an Experiment, as a YAML stream")
    render.add_argument("file", help="an Experiment resource (or a bare experiment spec)")
    render.add_argument("-n", "--namespace", help="namespace of the experiment (default: its metadata, else default)")
    render.add_argument("--trainer-api", choices=["trainjob", "pytorchjob"],
                        help="the trainer's API (default: the spec's scheduling.trainerApi; auto renders TrainJob)")
    render.set_defaults(handler=cmd_render)
    run = commands.add_parser("run", help="adapt on one dataset on this machine (the embedded default)")
    run.add_argument("spec", help="run spec (YAML), e.g. examples/tiny.yaml")
    run.add_argument("--out", default="runs/latest", help="folder for events.jsonl, report.json and report.png")
    run.add_argument("--nproc", type=count_argument(MAX_PROCESSES), default=None,
                     help="trainer processes (default: resources.processesPerNode, else one)")
    run.add_argument("--embedded-s3", action=argparse.BooleanOptionalAction, default=None,
                     help="keep the weight store on an embedded S3 server (default: with rollout.backend service)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    run.set_defaults(handler=cmd_run)

    plan = commands.add_parser("plan", help="memory per GPU for a spec (model states, activations, vLLM), from the "
                               "model's config alone; exits 1 when it will not fit")
    plan.add_argument("spec", help="run spec (YAML), or an Experiment with --kind experiment")
    plan.add_argument("--kind", choices=["run", "experiment"], default="run")
    plan.add_argument("--model-config", metavar="FILE",
                      help="the model's config.json (or its folder), where model.path is not on this machine")
    plan.add_argument("--colocated", action="store_true",
                      help="vLLM shares the trainer's GPU (rollout.backend service on one machine)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    plan.set_defaults(handler=cmd_plan)

    for plugin in entry_points(group="ttrv.commands"):  # `experiment` (operators/local/command.py)
        plugin.load()(commands)

    serve = commands.add_parser(
        "serve", help="the rollout service: sample over HTTP from the newest weight version in the store")
    serve.add_argument("--spec", required=True, help="run spec (YAML): model, rollout.engine, storage")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 in a pod)")
    serve.add_argument("--port", type=port_argument, default=8000, help="TCP port, 1 to 65535")
    serve.add_argument("--shared", metavar="RUNS.yaml",
                       help="an experiment's shared rollout service (rollout.shared): serve every run the file lists "
                            "(runs: [{name, storage}], maxLoras), each run's versions as its own LoRA adapter")
    serve.set_defaults(handler=cmd_serve)

    train = commands.add_parser("train", help="the trainer pod's command: launch this node's trainer workers "
                                "(torchrun's PET_* environment), exit with the failing worker's code")
    train.add_argument("--spec", required=True, help="run spec (YAML), /etc/ttrv/run.yaml in a pod")
    train.add_argument("--out", default=os.environ.get("TTRV_OUT", "/tmp/ttrv-out"),
                       help="folder for events.jsonl and the report (default $TTRV_OUT)")
    train.add_argument("--nproc-per-node", type=count_argument(MAX_PROCESSES), default=None,
                       help="workers on this node (default: PET_NPROC_PER_NODE, as the training-operator sets it)")
    train.add_argument("--standalone", action="store_true", help="a single node on loopback")
    train.set_defaults(handler=cmd_train)

    docs = spec.add_parser("docs", help="print the README's table of spec fields")
    docs.set_defaults(handler=cmd_spec_docs)
    return parser


def main(argv: list[str] | None = None) -> int:
    log.configure()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (SpecError, DataError, RunFolderError) as error:  # a run folder in use by another run, or not writable
        print(f"error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # a file or folder the command names cannot be used: its path and the OS's reason
        print(f"error: {error.filename or 'ttrv'}: {error.strerror or error}; check the path and its permissions",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
