"""`ttrv`: the command line. Each subcommand is a small function; errors exit non-zero with a message that names
the field or file and the fix, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys

from ttrv import log
from ttrv.data import DataError, check_dataset, read_dataset
from ttrv.spec import ExperimentSpec, RunSpec, SpecError, load_experiment, load_run_spec

EXIT_USAGE = 2


def cmd_data_check(args: argparse.Namespace) -> int:
    dataset = read_dataset(args.file, args.format, args.path_map)
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
    print(json.dumps(summary))
    return 1 if problems else 0


def cmd_spec_schema(args: argparse.Namespace) -> int:
    model = {"run": RunSpec, "experiment": ExperimentSpec}[args.kind]
    print(json.dumps(model.model_json_schema(), indent=2))
    return 0


def cmd_spec_validate(args: argparse.Namespace) -> int:
    if args.kind == "run":
        spec = load_run_spec(args.file)
    else:
        _, spec = load_experiment(args.file)
    print(json.dumps(spec.model_dump(mode="json")))
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
    check.add_argument("--choices", default="ABCD", help="valid option letters")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    log.configure()
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (SpecError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
