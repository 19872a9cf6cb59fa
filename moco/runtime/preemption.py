"""Stop a training run at the next step when the cluster asks, so that it can checkpoint and resume.

Slurm warns a job before its time limit with the signal named in ``--signal`` (our scripts ask for SIGUSR1 and
forward it to every task) and sends SIGTERM when it preempts, requeues or cancels a job, ``KillWait`` seconds
before SIGKILL. Either signal only sets a flag; the training loops poll it between steps (all ranks together,
so DDP never stops half-way through a collective), write ``checkpoint_last`` with the step reached and exit
with ``EXIT_REQUEUE``. The batch script then requeues the job (after SIGUSR1) or Slurm does (after SIGTERM), and
the next run resumes from that step.

``install()`` belongs at the very top of a ``__main__`` module, before ``import torch``: a signal arriving while
torch loads would otherwise kill the process outright.
"""
from __future__ import annotations

import signal

# sysexits.h EX_TEMPFAIL: "try again later". The batch scripts requeue on it.
EXIT_REQUEUE = 75
# A distributed run agrees on the flag every POLL_STEPS steps: each agreement is a collective and a wait for the
# GPU. At most POLL_STEPS steps (seconds on a GPU) of the warning's lead are spent before the stop.
POLL_STEPS = 10
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

_received: list[int] = []


class Preempted(Exception):
    """Raised by a training loop at the step where the stop was agreed; the checkpoint is the caller's job."""

    def __init__(self, step: int):
        super().__init__(f"stopped by {signal_name()} at step {step}")
        self.step = step


def _handler(signum, frame) -> None:
    _received.append(signum)


def install(signals=SIGNALS) -> dict:
    """Make each of ``signals`` request a stop; returns the handlers they had."""
    return {sig: signal.signal(sig, _handler) for sig in signals}


def signal_name() -> str:
    return signal.Signals(_received[0]).name if _received else "request"  # tests stop without a signal


def reset() -> None:
    _received.clear()


def stop_requested(device=None, step: int | None = None) -> bool:
    """True on every rank once any rank received a signal: a collective call, made at the same step everywhere.
    With ``step``, a distributed run only agrees at multiples of ``POLL_STEPS`` (False in between); a single
    process answers at once, for free."""
    local = bool(_received)
    import torch.distributed as dist  # deferred: install() must not pay for torch

    if not (dist.is_available() and dist.is_initialized()):
        return local
    if step is not None and step % POLL_STEPS:
        return False
    import torch

    flag = torch.tensor([int(local)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())

