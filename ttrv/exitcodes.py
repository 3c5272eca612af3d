"""Exit codes of ttrv's pod commands, fitted to the PyTorchJob `restartPolicy: ExitCode` contract: the
training-operator restarts a replica that exits 128-255 (retryable) and fails the job on 1-127 (permanent). The
rollout service (`ttrv serve`) keeps the same ranges, although its Deployment restarts it whatever the code: the code
tells a person (kubectl's last state, `ttrv run`'s log) why it stopped."""

from __future__ import annotations

OK = 0
# permanent: retrying cannot help, a person must fix something
BAD_SPEC = 2
BAD_DATA = 3
BAD_MODEL = 4
PERMANENT_FAILURE = 1
# retryable: the same command can succeed later
PREEMPTED = 143  # 128 + SIGTERM: Kubernetes asks the pod to stop (preemption, eviction, node drain)
STORE_UNAVAILABLE = 170
ROLLOUT_UNAVAILABLE = 171
LOST_PEER = 172
ROLLOUT_ENGINE_DIED = 173  # `ttrv serve`: its engine (the vLLM server, the sampling thread) died; a fresh start may work
KILLED = 137  # 128 + SIGKILL: the kubelet's kill after the grace period, or the kernel's out-of-memory killer

MEANINGS = {
    PERMANENT_FAILURE: "permanent failure",
    BAD_SPEC: "bad spec",
    BAD_DATA: "bad data",
    BAD_MODEL: "bad model",
    PREEMPTED: "terminated (SIGTERM)",
    STORE_UNAVAILABLE: "object store unavailable",
    ROLLOUT_UNAVAILABLE: "rollout service unavailable",
    LOST_PEER: "lost a peer rank",
    ROLLOUT_ENGINE_DIED: "the rollout engine died",
    KILLED: "killed (SIGKILL, often out of memory)",
}


def is_retryable(code: int) -> bool:
    return 128 <= code <= 255


def kind(code: int) -> str:
    """How logs and termination messages name a failure's class: retryable or permanent."""
    return "retryable" if is_retryable(code) else "permanent"


def of_process(returncode: int) -> int:
    """A child's return code as a process exit code, as a shell or the kubelet reports it: killed by signal s
    (Popen's -s) -> 128 + s."""
    return 128 - returncode if returncode < 0 else returncode


def meaning(code: int) -> str:
    """An exit code in words, as a failed run's status reports it: ttrv's own codes, SIGKILL, any other signal
    (128 + s); '' for a code that says nothing more."""
    return MEANINGS.get(code) or (f"signal {code - 128}" if code > 128 else "")
