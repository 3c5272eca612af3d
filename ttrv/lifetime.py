"""How long a run's processes live: every child of a run dies with the process that started it, and a run folder
is held by one run at a time.

Parent death. Linux's PR_SET_PDEATHSIG (prctl(2); man page PR_SET_PDEATHSIG(2const)) has the kernel send a chosen
signal to a process when its parent dies, SIGKILL included, where no handler of the parent runs. Two caveats of that
page shape this module:
- "The parent-death signal is sent upon subsequent termination of the parent thread": the parent is the *thread*
  that forked, not the process. A child started from a thread that ends before the process would be signalled
  early, so only children started from the main thread are tied (`tie_to_parent`).
- "If the parent thread ... [has] already terminated by the time of the PR_SET_PDEATHSIG operation, then no
  parent-death signal is sent": a parent that dies between fork and the prctl call is never reported. So after the
  prctl the child compares getppid() with the parent's pid it was given, and ends itself if they differ.

A trainer gets SIGTERM: it checkpoints after its current step and exits 143 (ttrv.train.PreemptionSignal). While it
does, it still needs the run's services (the embedded S3 store, the rollout service); a service started under a
run lock is therefore wrapped (`python -m ttrv.lifetime`) so that it stops only once the lock is free, i.e. once no
trainer of the run is left, and the store only after the services that read it (see `start`).

The run lock. `<folder>/.lock` is flock(2)ed exclusively by the run (`RunLock`) and inherited by its trainers
(`pass_fds`), so the folder stays locked until the last of them has exited, even when the run's own process was
SIGKILLed. An flock lock belongs to the open file description, which the children's inherited descriptors share,
and is released when the last of them is closed (flock(2)), however the processes end: a lock file left behind is
never mistaken for a live run.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import errno
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ttrv.log import get_logger

logger = get_logger(__name__)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PRCTL = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None) if sys.platform.startswith("linux") else None
PARENT_PID_ENV = "TTRV_PARENT_PID"
"""Set by a launcher whose own children are started by code that is not ours (torch elastic's workers): the pid of
the process whose death must end them; `die_with_launcher` reads it at their start."""
RUN_LOCK_ENV = "TTRV_RUN_LOCK"
"""The lock file of the run a child belongs to, in the environment of the run's children."""
LOCK_NAME = ".lock"
_POLL_SECONDS = 0.2


def die_with_parent(parent: int, signum: int = signal.SIGTERM) -> bool:
    """Have the kernel send `signum` to this process when the thread that started it ends. False when the parent
    `parent` is already gone (this process was re-parented before the prctl, so no signal will ever come): the
    caller must then end itself."""
    if _PRCTL is None:  # not Linux: nothing ties a child to its parent
        return True
    if _PRCTL(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_PDEATHSIG): {os.strerror(code)}")
    return os.getppid() == parent


def tie_to_parent(signum: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A `preexec_fn` for Popen: between fork and exec the child asks for `signum` when this process dies, or exits
    at once if this process died already. None (the child is not tied) when called outside the main thread: the
    kernel would signal the child when that thread ends, which may be long before this process does."""
    if _PRCTL is None:
        return None
    if threading.current_thread() is not threading.main_thread():
        logger.warning("child_not_tied_to_parent", thread=threading.current_thread().name,
                       reason="PR_SET_PDEATHSIG fires when the starting thread ends; only the main thread lives as "
                              "long as this process")
        return None
    parent = os.getpid()

    def preexec() -> None:  # in the forked child: no logging, no locks, no exceptions worth raising
        if not die_with_parent(parent, signum):
            os._exit(128 + int(signum))

    return preexec


def die_with_launcher() -> bool:
    """At the start of a process that a launcher's library started (torch elastic's workers, see ttrv.launch): tie
    it to the launcher named by TTRV_PARENT_PID, if any. False when that launcher is gone already. The variable is
    removed so that this process's own children do not take it for theirs."""
    value = os.environ.pop(PARENT_PID_ENV, None)
    if value is None or not value.isdigit():
        return True
    return die_with_parent(int(value), signal.SIGTERM)


# --- the run lock ---------------------------------------------------------------------------------------------

class RunFolderError(Exception):
    """The run folder cannot be used: not a folder, not writable, or held by another run; the message says which
    and what to do."""


def check_writable(folder: Path, what: str) -> None:
    """Create `folder` if needed and prove that files can be written in it, before any work; RunFolderError names
    `what` (the option or field that chose it) otherwise."""
    if folder.exists() and not folder.is_dir():
        raise RunFolderError(f"{what} {folder}: is a file, not a folder; name a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or str(error)
        raise RunFolderError(f"{what} {folder}: not writable ({reason}); choose a folder this user can write "
                             "to") from None


class RunLock:
    """`<folder>/.lock`, held exclusively (flock) by this run and by each child started with `holds=` this lock;
    the file says the pid of the run that took it."""

    def __init__(self, folder: Path, what: str = "--out"):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise RunFolderError (nothing written) when the folder is held, is not a folder, or
        cannot be written."""
        if self.folder.exists() and not self.folder.is_dir():
            raise RunFolderError(f"{self.what} {self.folder}: is a file, not a folder; name a folder (it is created "
                                 "if missing)")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise RunFolderError(f"{self.what} {self.folder}: not writable ({error.strerror or error}); choose a "
                                 "folder this user can write to") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunFolderError(self._in_use(int(holder) if holder.isdigit() else None)) from None
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            check_writable(self.folder, self.what)
        except BaseException:
            self.release()
            raise
        logger.info("run_folder_locked", folder=str(self.folder), pid=os.getpid())
        return self

    def _in_use(self, pid: int | None) -> str:
        others = [p for p in holders(self.path) if p != os.getpid()]
        if pid is not None and alive(pid):
            return (f"{self.what} {self.folder}: in use by another run (pid {pid}); wait for it to end, stop it "
                    f"(kill {pid}: its trainer checkpoints), or choose another {self.what}")
        still = f" (pids {', '.join(map(str, others))})" if others else ""
        return (f"{self.what} {self.folder}: in use: the run of pid {pid or 'unknown'} has ended, but its "
                f"processes{still} are still stopping (a trainer writes its checkpoint on the way out); run the "
                f"same command again once they have exited, or choose another {self.what}")

    def release(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)  # the children that hold it keep the folder locked until they exit

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *_exc) -> None:
        self.release()


def holders(path: Path) -> list[int]:
    """Pids of the processes that have `path` open (Linux /proc), this one included; empty where /proc is not."""
    target, found = str(path.resolve()), []
    with contextlib.suppress(OSError):
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if any(os.readlink(f"/proc/{entry.name}/fd/{fd}") == target
                       for fd in os.listdir(f"/proc/{entry.name}/fd")):
                    found.append(int(entry.name))
    return sorted(found)


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --- starting a run's children --------------------------------------------------------------------------------

def start(command: list[str], *, holds: RunLock | None = None, serves: str | Path | None = None,
          last: bool = False, grace: float = 30.0, **popen) -> subprocess.Popen:
    """Start a child of this run that ends with this process (PR_SET_PDEATHSIG, SIGTERM), from the main thread.

    holds: the run lock this child keeps held for as long as it lives (a trainer: the folder stays locked while it
        checkpoints after this process died).
    serves: the lock file of the run whose trainers use this child (the object store, the rollout service): it is
        wrapped so that it outlives this process until that lock is free, then gets SIGTERM, and SIGKILL `grace`
        seconds later; it never holds the lock itself. With `last` (the store the other services read), it stops
        only after those services too. A child of neither kind gets SIGTERM as soon as this process dies.
    """
    if holds is not None:
        if holds.fd is None:
            raise RuntimeError(f"the run lock {holds.path} is not held")
        popen["pass_fds"] = (*popen.get("pass_fds", ()), holds.fd)
    if serves is not None:
        command = [sys.executable, "-m", "ttrv.lifetime", "--parent", str(os.getpid()), "--until-free",
                   str(serves), "--grace", str(grace), *(["--last"] if last else []), "--", *command]
        # The wrapper tells this process's death from a stop request by the signal: SIGUSR1 means "parent gone".
        return subprocess.Popen(command, preexec_fn=tie_to_parent(signal.SIGUSR1), **popen)
    return subprocess.Popen(command, preexec_fn=tie_to_parent(), **popen)


def _lock_free(path: Path, mode: int = fcntl.LOCK_SH) -> int | None:
    """A descriptor holding `path` in `mode` (shared: once no process holds it exclusively, i.e. the run and its
    trainers are gone); None while that cannot be had. A missing file is free (the folder was removed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


def serve_until_free(parent: int, lock: Path, command: list[str], grace: float = 30.0, last: bool = False) -> int:
    """The wrapper of a run's service (`python -m ttrv.lifetime --parent P --until-free LOCK --grace S [--last] --
    COMMAND`).

    It runs COMMAND as its child, in a process group of its own, and passes SIGTERM, SIGINT and SIGHUP on to it (so
    a stop of the wrapper's group reaches the service once). When its parent P dies (SIGUSR1, or getppid() changes)
    it keeps the service up until the run lock is free, i.e. until the trainers have written their checkpoints and
    exited, then stops it with SIGTERM, and with SIGKILL `grace` seconds later. From then until the service has
    exited it holds the lock shared, so that a new run on the folder does not start beside a store that is still
    shutting down. The services hold `<lock>.services` shared for as long as they live, and the `last` one (the
    store they read) waits for it exclusively before it stops, so that no service is left retrying a store that
    is already gone. If the wrapper itself is SIGKILLed, the kernel SIGKILLs the service (its parent-death signal), as
    a killed pod takes its container. Exits with the service's exit code (128 + s when a signal s ended it)."""
    received: list[int] = []

    def note(signum, _frame) -> None:
        received.append(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(signum, note)
    services = lock.with_name(lock.name + ".services")
    if not last:  # from before the service starts until the wrapper exits: the store waits for it
        using = os.open(services, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(using, fcntl.LOCK_SH)
    child = subprocess.Popen(command, process_group=0, preexec_fn=tie_to_parent(signal.SIGKILL))
    held: int | None = None
    deadline = None
    while True:
        try:
            code = child.wait(timeout=_POLL_SECONDS)
            break
        except subprocess.TimeoutExpired:
            pass
        for signum in [s for s in received if s != signal.SIGUSR1]:
            child.send_signal(signum)
        received.clear()
        if held is None and os.getppid() != parent:
            held = _lock_free(lock)
            if held is not None and last:
                alone = _lock_free(services, fcntl.LOCK_EX)
                if alone is None:
                    os.close(held)
                    held = None
            if held is not None:
                logger.info("run_lock_free", lock=str(lock), pid=child.pid, action="stopping the service")
                child.send_signal(signal.SIGTERM)
                deadline = time.monotonic() + grace
        if deadline is not None and time.monotonic() > deadline:
            logger.warning("service_still_stopping", pid=child.pid, grace_s=grace, action="killing it")
            child.kill()
            deadline = None
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    from ttrv import log

    parser = argparse.ArgumentParser(prog="python -m ttrv.lifetime",
                                     description="Run a service of a run until the run's lock is free.")
    parser.add_argument("--parent", type=int, required=True, help="pid of the process that started this one")
    parser.add_argument("--until-free", type=Path, required=True, help="the run's lock file")
    parser.add_argument("--grace", type=float, default=30.0, help="seconds from SIGTERM to SIGKILL")
    parser.add_argument("--last", action="store_true", help="stop only after the run's other services")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command after --")
    log.configure()
    return serve_until_free(args.parent, args.until_free, command, args.grace, args.last)


if __name__ == "__main__":
    sys.exit(main())

