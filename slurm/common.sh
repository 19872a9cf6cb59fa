# shellcheck shell=bash
# Shared by the job scripts in slurm/ and by submit.sh; sourced, never run.
#
# A job script finds the repository (REPO) from $SLURM_SUBMIT_DIR, sources this file and calls, in order:
#   job_start STAGE [GROUP]  signal traps, log file, site config, environment, and the preflight (moco.doctor)
#   knob NAME DEFAULT        each tunable: $<STAGE>_NAME, $<GROUP>_NAME, $NAME, else DEFAULT; so R1_EPOCHS=2 is
#                            r1's alone, FPN_EXTRA_ARGS all three fine-tuning stages', WORKERS every job's
#   unpack_squashfs IMAGE DEST  data staging, when the site ships squashfs images
#   run_tasks ARGS...        one task per GPU on every node through srun, then requeue when the time limit is near

log() { echo "$(date '+%F %T') ${SLURM_JOB_ID:+[$SLURM_JOB_NAME $SLURM_JOB_ID] }$*"; }
die() { log "error: $*"; exit 1; }

# The site config: $SITE_CONF, else slurm/site.conf, else the documented example. Its lines keep any value
# already in the environment, so `sbatch --export=ALL,NAME=value` overrides it.
load_config() {
    local conf=${SITE_CONF:-$REPO/slurm/site.conf}
    if [[ ! -f $conf && -z ${SITE_CONF:-} ]]; then
        conf=$REPO/slurm/site.conf.example
        log "no slurm/site.conf: using $conf (copy it to slurm/site.conf and edit it for your site)"
    fi
    [[ -f $conf ]] || die "site config $conf: no such file"
    # shellcheck source=site.conf.example
    source "$conf" || die "site config $conf failed"
    SITE_CONF=$conf
}

knob() {
    local name=$1 value=$2 source
    for source in "$1" ${GROUP:+"${GROUP}_$1"} "${STAGE}_$1"; do  # least specific first: the most specific wins
        [[ -n ${!source+x} ]] && value=${!source}
    done
    printf -v "$name" '%s' "$value"
    log "  $name=$value"
}

job_start() {
    STAGE=$1 GROUP=${2:-}
    # First: a warning or preemption during the set-up below must reach a handler, not kill this shell.
    trap on_warning USR1
    trap on_terminate TERM
    # Slurm's own --output cannot create a folder; this log can, and it survives requeues (appended).
    LOG_DIR=${LOG_DIR:-$REPO/slurm/logs}
    mkdir -p "$LOG_DIR" || die "cannot create log directory $LOG_DIR"
    exec >>"$LOG_DIR/${SLURM_JOB_NAME}_${SLURM_JOB_ID}.out" 2>&1
    log "start on $(hostname -s), nodes ${SLURM_JOB_NODELIST:-?}, restart ${SLURM_RESTART_COUNT:-0}, repo $REPO"
    load_config
    if [[ -n ${ENV_SETUP:-} ]]; then
        eval "$ENV_SETUP" || die "ENV_SETUP failed: $ENV_SETUP"
    fi
    cd "$REPO" || die "cannot enter $REPO"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export MOCO_DEVICE CUDA_ARCHS  # read by moco.doctor and by every task's --device default
    preflight
    log "config $SITE_CONF; knobs:"
}

# Before any data is staged or read: the build, the driver, the GPUs this job was given, as the tasks will see
# them (inside CONTAINER). A job given GPUs that CUDA cannot use stops here, with the doctor's one sentence.
preflight() {
    # shellcheck disable=SC2086  # CONTAINER is a command prefix, split on purpose
    $CONTAINER "$PYTHON" -m moco.doctor || die "preflight failed (python -m moco.doctor, above); nothing was run"
}

# unpack_squashfs IMAGE DEST: unpack once; a parallel or requeued job finds DEST complete or unpacks its own copy
# and renames it into place, so DEST is never half-written.
unpack_squashfs() {
    local image=$1 dest=$2
    [[ -d $dest ]] && return 0
    [[ -f $image ]] || die "$image: no such squashfs image (and $dest does not exist)"
    command -v unsquashfs >/dev/null || die "unsquashfs not found: install squashfs-tools, or unpack $image yourself"
    local partial="$dest.partial.$SLURM_JOB_ID"
    log "unpacking $image into $dest"
    rm -rf "$partial"
    mkdir -p "$(dirname "$dest")" || die "cannot write beside $dest"
    unsquashfs -no-progress -d "$partial" "$image" >/dev/null || die "unsquashfs $image failed"
    mv -T "$partial" "$dest" 2>/dev/null || rm -rf "$partial"  # lost the race: the winner's copy is complete
}

WARNED=0
TASKS_PID=

# The time-limit warning (--signal=B:USR1@...) reaches only this shell, and bash runs a trap only once the
# foreground command returns: the tasks run in the background and the signal is passed on to them.
on_warning() {
    WARNED=1
    log "time limit near: the tasks checkpoint and stop, then the job requeues itself"
    [[ -n $TASKS_PID ]] && kill -USR1 "$TASKS_PID" 2>/dev/null
}

on_terminate() {
    log "SIGTERM (preemption, requeue or cancel): the tasks checkpoint and stop"
    [[ -n $TASKS_PID ]] && kill -TERM "$TASKS_PID" 2>/dev/null
}

requeue() {
    log "$1: requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed"
    exit 0
}

run_tasks() {
    # A warning during data staging: requeue now rather than start work that cannot finish.
    (( WARNED )) && requeue "time limit near before the tasks started"
    # One task per GPU; without GPUs (--gres=none) one per node. TASKS_PER_NODE overrides both.
    local per_node=${TASKS_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    # CPUs a task: the allocation's share, but never more than the cores this node really lets the job use
    # (oversubscribed BLAS threads crawl; a test cluster may declare more CPUs than it has).
    local cores
    cores=$(nproc)
    (( ${SLURM_CPUS_ON_NODE:-1} < cores )) && cores=${SLURM_CPUS_ON_NODE:-1}
    local cpus=$(( cores / per_node ))
    (( cpus > 0 )) || cpus=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus}
    log "srun: ${SLURM_JOB_NUM_NODES:-1} node(s) x $per_node task(s), $cpus CPU(s) each:" \
        "${CONTAINER:+$CONTAINER }$PYTHON $*"
    # shellcheck disable=SC2086  # CONTAINER is a command prefix, split on purpose
    srun --ntasks-per-node="$per_node" --cpus-per-task="$cpus" --kill-on-bad-exit=1 \
        $CONTAINER "$PYTHON" "$@" &
    TASKS_PID=$!
    while kill -0 "$TASKS_PID" 2>/dev/null; do
        wait "$TASKS_PID"  # returns early when a trap runs
    done
    wait "$TASKS_PID"
    local status=$?
    TASKS_PID=
    # 75: checkpointed, not finished (moco/preemption.py)
    (( status == 75 && WARNED )) && requeue "checkpoint saved"
    log "tasks ended with status $status"
    return "$status"
}
