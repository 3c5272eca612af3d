"""Bad arguments on the command line, as a user types them (the CLI's `main` in this process): each ends with a
message naming the option and the fix, never with a traceback, before any work (no model loaded, nothing written).
Argument types refuse at parse time (argparse's exit 2 and usage line); what needs the machine (a port in use)
is found before the model loads (exit 1)."""

from __future__ import annotations

import socket
from dataclasses import replace
from pathlib import Path

import pytest

from bad_inputs.catalogue import Case, cases, check, files_under

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
TINY = str(EXAMPLES / "tiny.yaml")


def listening() -> socket.socket:
    """A socket holding a loopback port, as another server would."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


# (argv with {out} for an output folder and {port} for a port in use, exit code)
ARGUMENTS = cases("command line", [
    ("nproc-negative", (["run", TINY, "--out", "{out}", "--nproc", "-1"], 2), ("--nproc", "-1"), "write 1 to 256"),
    ("nproc-zero", (["run", TINY, "--out", "{out}", "--nproc", "0"], 2), ("--nproc", "0 is out of range"),
     "write 1 to 256"),
    ("nproc-not-a-number", (["run", TINY, "--out", "{out}", "--nproc", "all"], 2), ("--nproc", "'all'"),
     "write 1 to 256"),
    ("nproc-per-node-negative", (["train", "--spec", TINY, "--out", "{out}", "--nproc-per-node", "-1"], 2),
     ("--nproc-per-node", "-1"), "write 1 to 256"),
    ("port-out-of-range", (["serve", "--spec", TINY, "--port", "70000"], 2), ("--port", "70000"),
     "write a port from 1 to 65535"),
    ("port-negative", (["serve", "--spec", TINY, "--port", "-1"], 2), ("--port", "-1"),
     "write a port from 1 to 65535"),
    ("port-in-use", (["serve", "--spec", TINY, "--port", "{port}"], 1), ("--port {port}", "in use"),
     "stop it or choose another --port"),
    ("host-not-an-address", (["serve", "--spec", TINY, "--host", "no such host!", "--port", "8123"], 1),
     ("--host 'no such host!'",), "use 127.0.0.1, or 0.0.0.0 in a pod"),
    ("set-integer-of-thousands-of-digits", (["run", TINY, "--out", "{out}", "--set", "seed=" + "9" * 5000], 1),
     ("--set",), "write numbers of a sensible size"),
    ("crds-out-is-a-file", (["spec", "crds", "--out", "{out}/file"], 1), ("--out", "is a file, not a folder"),
     "name a folder"),
])


@pytest.mark.parametrize("case", ARGUMENTS)
def test_the_command_line_refuses_the_argument(case: Case, tmp_path, cli, capsys):
    argv, code = case.input
    out = tmp_path / "out"
    if "crds" in argv:
        out.mkdir()
        (out / "file").write_text("a file")
    before = files_under(out)
    with listening() as holder:
        port = holder.getsockname()[1]
        try:
            exit_code, _, stderr = cli(*(arg.format(out=out, port=port) for arg in argv))
        except SystemExit as error:  # argparse's own exit, after printing the usage line and the problem
            exit_code, stderr = error.code, capsys.readouterr().err
    names = tuple(name.format(port=port) for name in case.names)
    check(replace(case, names=names), exit_code, stderr, sorted(set(files_under(out)) - set(before)))
    assert exit_code == code, stderr
