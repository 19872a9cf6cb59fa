#!/usr/bin/env python3
"""Submit the pipeline through submitit: what
`slurm/submit.sh moco_v2 demo_mocov2_fpn_r1 demo_mocov2_fpn_r2 demo_mocov2_fpn_r3 eval_mocov2_fpn` does, in Python.

    .venv/bin/python slurm/launch.py [--stages moco,r1,r2,r3,eval] [--after JOBID] [--nodes N]
                                     [--gpus-per-node G] [--timeout-min M] [--folder DIR]

The same site config (read by bash through common.sh), the same knobs in the environment (R1_EPOCHS=2,
FPN_EXTRA_ARGS=..., ALL_WORKERS=...), the same command lines, outputs and resources as the job scripts; the stages
are chained afterok, a failed one cancels those after it; a submission is a run of its own, as with submit.sh.
Prints "<stage> <job id>" per job; submitit's files and each job's log (<job id>_0_log.out/.err, Slurm's own lines
included) go to --folder, default $LOG_DIR/submitit.

Time limit and preemption: Slurm sends SIGUSR2 (submitit's signal) before the time limit, and on preemption where
SlurmctldParameters has preempt_send_user_signal; SIGTERM on preemption, requeue or cancel. In a training stage
either one stops the run at the next step with checkpoint_last, as in the shell path (moco.runtime.preemption); after
SIGUSR2 the job then requeues itself through submitit's own handler, after SIGTERM Slurm requeues it (or it was
cancelled, and fails with status 75). The rerun calls the same main with the same argv, which resumes from
checkpoint_last. Evaluation has no step-level stop: submitit requeues it at once and it starts over. submitit
bounds the time-limit requeues by MAX_REQUEUES of the site config; it does not count preemptions.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import submitit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script: moco/ and demo/ must import

from moco.runtime import preemption  # noqa: E402
from moco.runtime.logger import get_logger, setup_logging  # noqa: E402

log = get_logger("slurm.launch")

# The job scripts own their resources (#SBATCH lines) and knob defaults (knob lines); this file reads them there.
SCRIPTS = REPO / "slurm"


@dataclass(frozen=True)
class Resources:
    """What a job script asks for and its knobs' defaults, as written in it."""
    gpus: int  # --gres=gpu:N, per node
    cpus_per_gpu: int
    mem_per_gpu: str
    minutes: int  # --time
    warn_s: int | None  # the --signal lead time; None: no step-level stop (evaluation)
    knobs: dict[str, str]  # name -> default, as bash reads it (variables not yet expanded)


def _minutes(limit: str) -> int:
    """Slurm's --time forms with hours: [D-]H:MM:SS or [D-]H:MM."""
    days, _, clock = limit.rpartition("-")
    hours, minutes, *_ = (int(part) for part in clock.split(":"))
    return (int(days or 0) * 24 + hours) * 60 + minutes


def read_script(script: str) -> Resources:
    path = SCRIPTS / f"{script}.slurm"
    text = path.read_text()

    def sbatch(option: str) -> str | None:
        found = re.search(rf"^#SBATCH --{option}=(\S+)", text, re.M)
        return found[1] if found else None

    knobs = {}
    for name, rest in re.findall(r"^knob (\w+) (.*)$", text, re.M):
        words = shlex.split(rest, comments=True)
        knobs[name] = words[0] if words else ""
    gres, warn = sbatch("gres"), sbatch("signal")
    if gres is None or sbatch("time") is None:
        raise SystemExit(f"{path}: no #SBATCH --gres=gpu:N or --time line to take the job's resources from")
    return Resources(int(gres.rpartition(":")[2]), int(sbatch("cpus-per-gpu") or 1), sbatch("mem-per-gpu") or "",
                     _minutes(sbatch("time")), int(warn.rpartition("@")[2]) if warn else None, knobs)


@dataclass(frozen=True)
class Stage:
    script: str  # the job script it replaces: job name, as in squeue and submit.sh
    module: str
    knob_stage: str  # STAGE and GROUP of common.sh's knob
    knob_group: str
    partition: str  # the site config's variable
    data: tuple[str, str]  # (squashfs image, directory) variables of the site config, for stage_data
    argv: Callable[[dict], list[str]]  # from the config and the knobs: what the script passes to python -m

    @property
    def resources(self) -> Resources:
        return read_script(self.script)


def _finetune(stage: str) -> Stage:
    # r1 starts from the backbone under a protocol (empty: demo.train's default); r2 and r3 keep their checkpoint's.
    # An empty EPOCHS or BATCH_SIZE is the recipe's (demo/recipe.py), which demo.train applies.
    return Stage(
        f"demo_mocov2_fpn_{stage}", "demo.train", stage.upper(), "FPN", "FINETUNE_PARTITION",
        ("LABELED_SQSH", "LABELED_ROOT"),
        lambda v: ["--stage", stage, *(["--bp", v["BACKBONE"]] if "BACKBONE" in v else []), "--dataset-root",
                   v["LABELED_ROOT"], "--output-dir", f"{v['RUN_DIR']}/fpn",
                   *(["--epochs", v["EPOCHS"]] if v["EPOCHS"] else []),
                   *(["-b", v["BATCH_SIZE"]] if v["BATCH_SIZE"] else []),
                   *(["--protocol", v["PROTOCOL"]] if v.get("PROTOCOL") else []),
                   *(["--lr", v["LR"]] if v["LR"] else []), "-j", v["WORKERS"],
                   *v["EXTRA_ARGS"].split()])  # split(): bash's word splitting of the unquoted $EXTRA_ARGS


STAGES = {
    "moco": Stage(
        "moco_v2", "moco.train", "MOCO", "", "PRETRAIN_PARTITION", ("UNLABELED_SQSH", "UNLABELED_DIR"),
        lambda v: [v["UNLABELED_DIR"], "--output-dir", f"{v['RUN_DIR']}/moco", "-a", v["ARCH"], "--epochs",
                   v["EPOCHS"], "-b", v["BATCH_SIZE"], "--lr", v["LR"], "-j", v["WORKERS"], "--mlp", "--moco-t",
                   "0.2", "--aug-plus", "--cos", *v["EXTRA_ARGS"].split()]),
    "r1": _finetune("r1"),
    "r2": _finetune("r2"),
    "r3": _finetune("r3"),
    "eval": Stage(
        "eval_mocov2_fpn", "demo.evaluate", "EVAL", "", "EVAL_PARTITION", ("LABELED_SQSH", "LABELED_ROOT"),
        lambda v: ["--checkpoint-path", v["CHECKPOINT"], "--dataset-root", v["LABELED_ROOT"], "--dataset-split",
                   v["SPLIT"], "-b", v["BATCH_SIZE"], "-j", v["WORKERS"], *v["EXTRA_ARGS"].split()]),
}


def _expand(value: str, cfg: dict[str, str]) -> str:
    """A knob default's $NAME / ${NAME}, from the config, as bash expands it in the script."""
    return re.sub(r"\$\{?(\w+)\}?", lambda found: cfg.get(found[1], ""), value)


def read_config() -> dict[str, str]:
    """The environment after common.sh's load_config, as a job script sees it: bash sources the site config, so it
    has a single reader and keeps its rule that values already in the environment win. `set -a` exports what the
    file assigns, so that `env -0` lists it. As in submit.sh, a submission is a run of its own (RUN_NAME: the date
    and time) unless RUN_NAME or RUN_DIR is set."""
    env = {**os.environ, "REPO": str(REPO)}
    if not env.get("RUN_NAME") and not env.get("RUN_DIR"):
        env["RUN_NAME"] = time.strftime("%Y%m%d-%H%M%S")
    script = 'source "$REPO/slurm/common.sh" && set -a && load_config >&2 && env -0'
    done = subprocess.run(["bash", "-c", script], env=env, stdout=subprocess.PIPE)
    if done.returncode:
        raise SystemExit(f"reading the site config failed (status {done.returncode}, see above)")
    return dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if item)


def knob(cfg: dict[str, str], stage: str, group: str, name: str, default: str) -> str:
    """common.sh's knob: $<STAGE>_<NAME>, then $<GROUP>_<NAME>, then $ALL_<NAME>; set counts, even when empty. A
    bare <NAME> is never read."""
    for key in (f"{stage}_{name}", *([f"{group}_{name}"] if group else []), f"ALL_{name}"):
        if key in cfg:
            return cfg[key]
    return default


def stage_argv(stage: Stage, cfg: dict[str, str]) -> list[str]:
    knobs = stage.resources.knobs
    values = {**cfg, **{name: knob(cfg, stage.knob_stage, stage.knob_group, name, _expand(default, cfg))
                        for name, default in knobs.items()}}
    log.info("%s knobs: %s", stage.script, " ".join(f"{name}={values[name]!r}" for name in knobs))
    return stage.argv(values)


def data_check(stage: Stage, cfg: dict[str, str]) -> list[str]:
    """The batch script's lines for the CHECK_DATA knob (training stages): common.sh's check_data on the stage's
    data, which stops the job before the tasks start when the check finds errors."""
    checked = knob(cfg, stage.knob_stage, stage.knob_group, "CHECK_DATA", "0") == "1"
    if "CHECK_DATA" not in stage.resources.knobs or not checked:
        return []
    return [f"CHECK_DATA=1 STAGE={stage.knob_stage} TASK_PYTHON={shlex.quote(cfg['TASK_PYTHON'])} "
            f"CONTAINER={shlex.quote(cfg.get('CONTAINER', ''))} check_data {shlex.quote(cfg[stage.data[1]])}"]


def data_staging(stage: Stage, cfg: dict[str, str]) -> str:
    """The batch script's line for the stage's data: common.sh's stage_data, which unpacks its squashfs image once,
    or on every node under NODE_SCRATCH, and stops a job on several nodes where a node lacks the folder."""
    image, directory = stage.data
    values = {name: cfg.get(name, "") for name in (image, directory, "NODE_SCRATCH", "TASK_PYTHON", "CONTAINER")}
    return " ".join([*(f"{name}={shlex.quote(value)}" for name, value in values.items()), "stage_data", image,
                     directory])


class StageJob(submitit.helpers.Checkpointable):
    """`python -m <module> <argv>` as one task of a job, in-process. The inherited checkpoint() resubmits this same
    object, so a requeued job calls main with the same argv, and main resumes from checkpoint_last."""

    def __init__(self, module: str, argv: list[str], stops_at_step: bool):
        self.module, self.argv, self.stops_at_step = module, argv, stops_at_step

    def __call__(self) -> None:
        # The batch script's setup made REPO the working directory and put it on PYTHONPATH (see submit()), before
        # this object was unpickled. Handlers go first: a signal while torch imports must not kill the task.
        time_limit = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)
        if self.stops_at_step:
            # submitit's handler would requeue at once, losing the steps since the last checkpoint: keep it for
            # after the step-level checkpoint. SIGTERM and SIGUSR1 set the same flag, polled at every step.
            requeue = preemption.install((time_limit, *preemption.SIGNALS))[time_limit]
        logging.getLogger("submitit").propagate = False  # it has its own handlers: main's would print it twice
        try:
            importlib.import_module(self.module).main(self.argv)
        except SystemExit as exc:
            if exc.code != preemption.EXIT_REQUEUE:  # an error message: a result submitit reports as the failure
                raise RuntimeError(f"python -m {self.module} exited: {exc.code}") from exc
            if preemption.signal_name() == time_limit.name:
                log.warning("checkpoint saved after %s (time limit near): requeueing through submitit",
                            time_limit.name)
                requeue(time_limit, None)  # rank 0: checkpoint(), scontrol requeue, exit; other ranks return
            # Exit 75 with no result: the job fails unless requeued (by rank 0 or by Slurm after a preemption), so
            # afterok never lets the next stage start on an unfinished one.
            raise
        # main's return value (a whole model for moco.train) stays out of the result pickle: outputs are in RUN_DIR.


def submit(names: list[str], cfg: dict[str, str], args: argparse.Namespace) -> list[tuple[str, submitit.Job]]:
    # The batch script's shell, before the tasks start, as job_start and run_tasks set it up.
    setup = [f"eval {shlex.quote(cfg['ENV_SETUP'])} || {{ echo 'ENV_SETUP failed' >&2; exit 1; }}"] \
        if cfg.get("ENV_SETUP") else []
    python = " ".join(filter(None, [cfg.get("CONTAINER"), shlex.quote(cfg["TASK_PYTHON"])]))  # CONTAINER: a prefix
    setup += [f"cd {shlex.quote(str(REPO))} || exit 1",
              f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}",
              *(f"export {name}={shlex.quote(cfg[name])}" for name in ("MOCO_DEVICE", "CUDA_ARCHS",
                "MOCO_RENDEZVOUS_TIMEOUT", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG", "RENDEZVOUS_ADDR", "RENDEZVOUS_PORT")
                if cfg.get(name)),
              f"source {shlex.quote(str(REPO / 'slurm' / 'common.sh'))}", "export_network",
              # common.sh's: from the job, never a MASTER_ADDR/PORT of the submitting shell; found here, since the
              # tasks may run in a container without Slurm's commands to find the first node.
              "(( ${SLURM_NTASKS:-1} <= 1 )) || export_rendezvous",
              # common.sh's preflight, on every node: a job given GPUs that CUDA cannot use stops before any data
              # is read.
              f"on_every_node {python} -m moco.runtime.doctor --exercise || {{ echo 'preflight failed (python -m "
              f"moco.runtime.doctor --exercise on every node, above)' >&2; exit 1; }}",
              # Threads a task: its CPUs, capped like run_tasks at the cores the node really gives.
              "cpus=$(( $(nproc) / SLURM_NTASKS_PER_NODE )); (( cpus <= SLURM_CPUS_PER_TASK )) || "
              "cpus=$SLURM_CPUS_PER_TASK; (( cpus > 0 )) || cpus=1",
              "export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus}"]
    extra = {}
    for option in cfg.get("SBATCH_EXTRA", "").split():
        name, _, value = option.partition("=")
        if not name.startswith("--"):
            raise SystemExit(f"SBATCH_EXTRA: {option!r}: write sbatch options as --name=value or --flag")
        extra[name[2:]] = value or True
    folder = args.folder or Path(cfg.get("LOG_DIR") or REPO / "slurm" / "logs") / "submitit"

    jobs, after = [], args.after
    for name in names:
        stage = STAGES[name]
        argv = stage_argv(stage, cfg)
        res = stage.resources
        gpus = res.gpus if args.gpus_per_node is None else args.gpus_per_node
        executor = submitit.AutoExecutor(folder, cluster="slurm", slurm_python=python,
                                         slurm_max_num_timeout=int(cfg.get("MAX_REQUEUES") or 20))
        executor.update_parameters(  # None: not set (submitit drops it)
            name=stage.script, nodes=args.nodes, tasks_per_node=max(gpus, 1), gpus_per_node=gpus or None,
            cpus_per_task=res.cpus_per_gpu, timeout_min=args.timeout_min or res.minutes,
            slurm_mem_per_gpu=res.mem_per_gpu if gpus and res.mem_per_gpu else None,
            slurm_partition=cfg[stage.partition],
            slurm_account=cfg.get("ACCOUNT") or None,
            slurm_setup=[*setup, data_staging(stage, cfg), *data_check(stage, cfg)],
            slurm_signal_delay_s=res.warn_s, slurm_dependency=f"afterok:{after}" if after else None,
            slurm_additional_parameters={"requeue": True, **({"kill-on-invalid-dep": "yes"} if after else {}),
                                         **extra})
        job = executor.submit(StageJob(stage.module, argv, stops_at_step=res.warn_s is not None))
        log.info("%s: job %s, python -m %s %s", stage.script, job.job_id, stage.module, shlex.join(argv))
        print(name, job.job_id, flush=True)  # at once, as submit.sh: a later failure leaves these ids known
        jobs.append((name, job))
        after = job.job_id
    return jobs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES),
                   help="stages to submit, in pipeline order, each after the one before (default: %(default)s)")
    p.add_argument("--after", metavar="JOBID", help="the first stage waits for this job to succeed")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, help="default: the job script's #SBATCH --gres; one task per GPU; "
                                                     "0: one CPU task per node, no GPU")
    p.add_argument("--timeout-min", type=int, help="default: the job script's #SBATCH --time")
    p.add_argument("--folder", type=Path, help="submitit's folder (default: $LOG_DIR/submitit)")
    args = p.parse_args(argv)
    args.stages = args.stages.split(",")
    if any(s not in STAGES for s in args.stages) or args.stages != sorted(set(args.stages), key=list(STAGES).index):
        p.error(f"--stages {','.join(args.stages)}: a subset of {','.join(STAGES)}, in this order")
    for name in args.stages:  # common.sh's check_time_limit: a warning minutes after every start would churn
        lead = STAGES[name].resources.warn_s
        if args.timeout_min and lead and args.timeout_min * 60 < 2 * lead:
            p.error(f"--timeout-min {args.timeout_min}: stage {name} is warned {lead} s before its time limit to "
                    f"checkpoint and would requeue itself every few minutes; give at least {2 * lead // 60}")
    return args


def main(argv: list[str] | None = None) -> list[tuple[str, submitit.Job]]:
    args = parse_args(argv)
    cfg = read_config()
    log.info("run directory: %s", cfg["RUN_DIR"])
    log.info("config %s", cfg["SITE_CONF"])
    return submit(args.stages, cfg, args)


if __name__ == "__main__":
    setup_logging()
    logging.getLogger().handlers[0].setStream(sys.stderr)  # stdout carries only the job ids, as submit.sh's
    main()
