"""`ttrv train`: the trainer pod's command. torchrun's launcher (it reads PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK, PET_MASTER_ADDR, PET_MASTER_PORT, as the training-operator sets them), with one difference that the
PyTorchJob `restartPolicy: ExitCode` contract needs: it exits with the failing worker's own exit code.

Plain torchrun exits 1 whenever a worker fails, so a preempted (143) or store-unavailable (170) trainer would look
permanent to the training-operator and never be restarted. Here the first failure's code is passed on (a worker
killed by signal s exits 128 + s), and a SIGTERM to the launcher itself (Kubernetes stopping the pod) reaches the
workers, which checkpoint and exit 143.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ttrv import exitcodes, lifetime
from ttrv.log import get_logger

logger = get_logger(__name__)


def choose_accelerator(environ: Mapping[str, str], cuda_available: bool) -> str:
    """DeepSpeed's accelerator for the trainer's processes: the user's DS_ACCELERATOR when set, else cuda where
    torch sees a GPU, else cpu. DeepSpeed reads DS_ACCELERATOR first and probes only without it
    (deepspeed/accelerator/real_accelerator.py, `get_accelerator`); the probe tries intel_extension_for_pytorch,
    npu, mps, hpu and others before cuda, so naming the choice keeps it to the hardware torch itself uses."""
    chosen = environ.get("DS_ACCELERATOR", "")
    if chosen:
        return chosen
    return "cuda" if cuda_available else "cpu"


def accelerator_env(environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` with DS_ACCELERATOR chosen (choose_accelerator) from this machine's hardware."""
    import torch

    return {**environ, "DS_ACCELERATOR": choose_accelerator(environ, torch.cuda.is_available())}


def launch(worker_args: list[str], nproc: int | None = None, standalone: bool = False) -> int:
    """Run `python -m ttrv.train <worker_args>` on this node's workers; the exit code for the pod."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    argv = [f"--nproc-per-node={nproc}"] if nproc else []
    argv += ["--standalone"] if standalone else []
    # max-restarts 0: a failed worker fails the pod, and Kubernetes decides from the exit code whether to retry
    args = parse_args([*argv, "--max-restarts=0", "-m", "ttrv.train", *worker_args])
    # torchrun's run() starts the workers through torch elastic (SubprocessHandler._popen in torch/distributed/elastic/
    # multiprocessing/subprocess_handler/subprocess_handler.py: Popen with start_new_session and `os.environ` plus
    # the worker's variables, no preexec_fn), so each worker ties itself to this process at its start
    # (ttrv.train.main). A SIGTERM to this process reaches them through torch's own shutdown (SignalException ->
    # `_shutdown(SIGTERM)`: SIGTERM to each worker's group, SIGKILL after TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s); a
    # SIGKILL only through theirs.
    os.environ[lifetime.PARENT_PID_ENV] = str(os.getpid())
    os.environ.update(accelerator_env(os.environ))
    try:
        # torchrun's own run(), not config_from_args + elastic_launch: run() is where --standalone becomes a c10d
        # rendezvous on localhost:0 (torch/distributed/run.py, run()); bypassing it left the endpoint '127.0.0.1:None'.
        # Only torchrun's `main` (its @record error file) is left out: the exit code is ours to choose.
        run(args)
    except ChildFailedError as error:
        _, failure = error.get_first_failure()
        code = exitcodes.of_process(failure.exitcode)
        logger.error("trainer_worker_failed", local_rank=failure.local_rank, exit_code=code,
                     kind=exitcodes.kind(code))
        return code
    except SignalException as error:
        return exitcodes.of_process(-int(error.sigval))  # the signal that stopped the launcher, as a shell says
    return exitcodes.OK
