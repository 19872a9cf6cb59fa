"""Where an interrupted run stopped and where its requeued run resumed, read from the job's log (which logs every
step, -p 1), so that the Slurm tests need not guess how far a run gets before the signal lands."""
import re


def stop_point(log: str, signal: str, steps: int) -> tuple[int, int]:
    """(epoch, step) of the stop, as the checkpoint saves it: the epoch of the last step logged before the stop,
    or the next epoch when the stop came before an epoch's first step."""
    stop = re.search(rf"stopped by {signal} at step (\d+)", log)
    assert stop, log
    step = int(stop.group(1))
    logged = re.findall(rf"epoch (\d+) step \d+/{steps} ", log[:stop.start()])
    assert logged, log
    return int(logged[-1]) + (step == 0), step


def moco_resume_point(log: str) -> tuple[int, int]:
    resumed = re.search(r"resumed from .* at epoch (\d+) step (\d+) of \d+ epochs", log)
    assert resumed, log
    return int(resumed.group(1)), int(resumed.group(2))


def stage_resume_point(log: str, stage: str) -> tuple[int, int]:
    resumed = re.search(rf"stage {stage} \(resume from .*\): epochs (\d+)\.\.\d+ \(from step (\d+)\)", log)
    assert resumed, log
    return int(resumed.group(1)), int(resumed.group(2))
