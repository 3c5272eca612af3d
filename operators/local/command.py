"""`ttrv experiment run FILE --local`: the `experiment` command of the ttrv CLI, which lives here because it runs the
operator's reconcile loop. pyproject.toml registers `add_parser` in the entry-point group `ttrv.commands`, where
ttrv/cli.py finds it, so the dependency goes one way: operators imports ttrv, ttrv never imports operators."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from ttrv.cli import EXIT_USAGE, SET_HELP, experiment_of, naming_file, overrides, with_overrides


def add_parser(commands: argparse._SubParsersAction) -> None:
    experiment = commands.add_parser("experiment", help="experiments: several datasets, one adaptation run each")
    experiment_commands = experiment.add_subparsers(dest="experiment_command", required=True)
    experiment_run = experiment_commands.add_parser(
        "run", help="run an Experiment's objects as the cluster would, on this machine (--local)")
    experiment_run.add_argument("file", help="an Experiment resource (or a bare experiment spec)")
    experiment_run.add_argument("--local", action="store_true",
                                help="run here: pods as local processes, the store on an embedded S3 server")
    experiment_run.add_argument("--out", help="folder for status.json, the runs' files and the store "
                                "(default runs/<experiment>)")
    experiment_run.add_argument("-n", "--namespace", help="namespace of the experiment (default: its metadata, "
                                "else default); part of each run's store prefix")
    experiment_run.add_argument("--set", action="append", metavar="KEY=VALUE", help=SET_HELP)
    experiment_run.set_defaults(handler=cmd_experiment_run)


def cmd_experiment_run(args: argparse.Namespace) -> int:
    if not args.local:
        print("error: ttrv experiment run: only --local runs here; in a cluster the operator runs an Experiment "
              "(`kubectl apply -f FILE`, or `helm install NAME charts/ttrv -f values.yaml`)", file=sys.stderr)
        return EXIT_USAGE
    from operators.local.controller import run_experiment
    from operators.local.table import status_table

    metadata, spec = experiment_of(args)
    spec = with_overrides(spec, overrides(args))
    out = Path(args.out or f"runs/{metadata['name']}")
    signal.signal(signal.SIGTERM, _interrupt)  # stop the runs' processes as Ctrl-C does, not orphan them
    with naming_file(args.file):  # run_experiment checks the experiment before it writes anything
        document = run_experiment(metadata, spec, out)
    print(status_table(document))
    print(f"status: {out / 'status.json'}")
    return 0 if document["experiment"]["status"]["phase"] == "Succeeded" else 1


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt
