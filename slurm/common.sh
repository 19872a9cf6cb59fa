# shellcheck shell=bash
# Shared by the job scripts in slurm/ and by submit.sh; sourced, never run.
#
# A job script finds the repository (REPO) from $SLURM_SUBMIT_DIR, sources this file and calls, in order:
#   job_start STAGE [GROUP]  signal traps, log file, site config, time limit check, environment, and the preflight
#   knob NAME DEFAULT        each tunable: ${STAGE}_NAME, else ${GROUP}_NAME, else ALL_NAME, else DEFAULT; so
#                            R1_EPOCHS=2 is r1's alone, FPN_EXTRA_ARGS the three fine-tuning stages', ALL_WORKERS
#                            every job's. A bare NAME is never read: a leftover `export EPOCHS=1` changes nothing
#   stage_data IMAGE_VAR DIR_VAR  the data (e.g. UNLABELED_SQSH UNLABELED_DIR) where every node's tasks find it:
#                            a squashfs image unpacked once, or once a node under NODE_SCRATCH
#   check_data PATH...       with the knob CHECK_DATA at 1: every file of the job's data checked before training
#   run_tasks ARGS...        one task per GPU on every node through srun, then requeue when the time limit is near
# and on_every_node COMMAND... runs COMMAND once on each node of the job (the preflight, per-node staging).

# A step on every node sources this file again, by this path.
COMMON_SH=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")

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
    [[ -n ${TASK_PYTHON:-} ]] || die "site config $conf sets no TASK_PYTHON (the Python that runs each task;" \
        "called PYTHON before): add the line from slurm/site.conf.example"
}

knob() {
    local name=$1 value=$2 source
    for source in "ALL_$1" ${GROUP:+"${GROUP}_$1"} "${STAGE}_$1"; do  # least specific first: the most specific wins
        [[ -n ${!source+x} ]] && value=${!source}
    done
    [[ -n ${!name+x} ]] && log "  ignored: $name=${!name} from the environment (the knob is ${STAGE}_$name," \
        "or ALL_$name)"
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
    keep_slurm_output
    load_config
    check_time_limit
    if [[ -n ${ENV_SETUP:-} ]]; then
        eval "$ENV_SETUP" || die "ENV_SETUP failed: $ENV_SETUP"
    fi
    cd "$REPO" || die "cannot enter $REPO"
    export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
    export MOCO_DEVICE CUDA_ARCHS MOCO_RENDEZVOUS_TIMEOUT  # read by moco.runtime.doctor and by every task
    export_network
    preflight
    log "config $SITE_CONF; knobs:"
}

# Slurm writes its own lines (CANCELLED DUE TO TIME LIMIT, oom-kill, errors before this script's log starts) to the
# job's --output file: where it is not in LOG_DIR (a plain sbatch writes it beside where sbatch ran), a link to it
# sits beside this job's log.
keep_slurm_output() {
    local file link=$LOG_DIR/${SLURM_JOB_NAME}_${SLURM_JOB_ID}.slurm.out
    file=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | grep -o 'StdOut=[^ ]*' | cut -d= -f2-)
    [[ -n $file && $file != /dev/null ]] || return 0
    [[ $file -ef $link ]] || ln -sfn "$file" "$link" 2>/dev/null
    log "Slurm's own messages for this job: $link"
}

# seconds DURATION: Slurm's [D-][HH:]MM:SS as seconds; fails for UNLIMITED and the like.
seconds() {
    local d=0 h=0 m s rest=$1
    [[ $rest =~ ^(([0-9]+)-)?(([0-9]+):)?([0-9]+):([0-9]+)$ ]] || return 1
    d=${BASH_REMATCH[2]:-0} h=${BASH_REMATCH[4]:-0} m=${BASH_REMATCH[5]} s=${BASH_REMATCH[6]}
    echo $(( ((10#$d * 24 + 10#$h) * 60 + 10#$m) * 60 + 10#$s ))
}

# A job whose time limit is not above twice its warning lead (the script's --signal=B:USR1@LEAD) would be warned
# within minutes of every start and requeue itself over and over, paying start-up (and the queue) each time for a
# few steps: refuse it at once, saying what to give instead.
check_time_limit() {
    local lead limit
    lead=$(sed -n 's/^#SBATCH --signal=B:USR1@\([0-9]*\).*/\1/p' "$0" | head -n1)
    [[ -n $lead ]] || return 0  # no warning asked for (evaluation)
    limit=$(seconds "$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null)") || return 0  # unlimited or unknown
    (( limit >= 2 * lead )) || die "the time limit ($limit s) is too short for this job: it is warned $lead s" \
        "before the limit to checkpoint, and would requeue itself every $(( limit > lead ? limit - lead : 0 )) s." \
        "Give --time of at least $(( (2 * lead + 59) / 60 )) minutes"
}

# NCCL and gloo settings of the site config, for every task (srun passes the environment on).
export_network() {
    local name
    for name in NCCL_SOCKET_IFNAME NCCL_DEBUG; do
        [[ -n ${!name:-} ]] && export "${name?}"
    done
    [[ -n ${NCCL_SOCKET_IFNAME:-} ]] && export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-$NCCL_SOCKET_IFNAME}
    return 0
}

# Before any data is staged or read: the build, the driver, the GPUs this job was given, as the tasks will see
# them (inside CONTAINER), and a second of real work on each GPU, on every node. A job given GPUs that CUDA cannot
# use stops here, with the doctor's one sentence; srun's error line names the node.
preflight() {
    # shellcheck disable=SC2086  # CONTAINER is a command prefix, split on purpose
    on_every_node $CONTAINER "$TASK_PYTHON" -m moco.runtime.doctor --exercise \
        || die "preflight failed (python -m moco.runtime.doctor --exercise on every node, above); nothing was run"
}

# check_data PATH...: with CHECK_DATA=1 (a knob: R1_CHECK_DATA, FPN_CHECK_DATA, ALL_CHECK_DATA...), python -m
# demo.check decodes every image of PATH and reads every label file on this node's CPUs before the tasks start (the
# GPUs wait meanwhile); a dataset with errors stops the job here (exit 1: failed, not requeued; afterok stages
# cancelled) instead of hours into training.
check_data() {
    [[ ${CHECK_DATA:-0} == 1 ]] || return 0
    log "checking the data first (CHECK_DATA=1): python -m demo.check $*"
    local status=0
    # shellcheck disable=SC2086  # CONTAINER is a command prefix, split on purpose
    $CONTAINER "$TASK_PYTHON" -m demo.check "$@" || status=$?
    (( status == 0 )) && { log "data check passed"; return 0; }
    (( status == 1 )) && die "the data check found errors, listed by kind in its report above in this log:" \
        "fix or remove those files and submit again (or set ${STAGE}_CHECK_DATA=0 to train without the check);" \
        "nothing was run"
    die "the data check could not run (python -m demo.check, status $status, above); nothing was run"
}

# unpack_squashfs IMAGE DEST: unpack once; a parallel or requeued job, or another node of this job on the same
# filesystem, finds DEST complete or unpacks its own copy and renames it into place, so DEST is never half-written.
unpack_squashfs() {
    local image=$1 dest=$2 node=${SLURMD_NODENAME:-$(hostname -s)}
    if [[ -d $dest ]]; then
        log "on $node: $dest is already unpacked"
        return 0
    fi
    [[ -f $image ]] || die "$image: no such squashfs image (and $dest does not exist)"
    command -v unsquashfs >/dev/null || die "unsquashfs not found: install squashfs-tools, or unpack $image yourself"
    local partial="$dest.partial.$SLURM_JOB_ID.$node"
    log "on $node: unpacking $image into $dest"
    rm -rf "$partial"
    mkdir -p "$(dirname "$dest")" || die "cannot write beside $dest"
    unsquashfs -no-progress -d "$partial" "$image" >/dev/null || die "unsquashfs $image failed"
    mv -T "$partial" "$dest" 2>/dev/null || rm -rf "$partial"  # lost the race: the winner's copy is complete
}

# stage_data IMAGE_VAR DIR_VAR (e.g. UNLABELED_SQSH UNLABELED_DIR): the tasks of every node must find the folder
# named by DIR_VAR. Under NODE_SCRATCH (node-local storage) each node unpacks its own copy of the image named by
# IMAGE_VAR; elsewhere the folder is taken to be on a shared filesystem, unpacked once from here. A job on several
# nodes then checks, as its tasks see it (inside CONTAINER), that every node has the folder.
stage_data() {
    local image=${!1:-} dest=${!2}
    if [[ -n $image && -n ${NODE_SCRATCH:-} && $dest == "${NODE_SCRATCH%/}"/* ]]; then
        on_every_node bash -c 'source "$1" && unpack_squashfs "$2" "$3"' stage "$COMMON_SH" "$image" "$dest" \
            || die "unpacking $image into $dest on every node failed (above)"
    elif [[ -n $image ]]; then
        unpack_squashfs "$image" "$dest"
    fi
    (( ${SLURM_JOB_NUM_NODES:-1} > 1 )) || return 0
    # shellcheck disable=SC2086  # CONTAINER is a command prefix, split on purpose
    on_every_node $CONTAINER "$TASK_PYTHON" -c 'import os, sys; sys.exit(not os.path.isdir(sys.argv[1]))' "$dest" \
        || die "$2=$dest is not a folder on every node of this job (srun names the node above): put it on a" \
            "filesystem every node mounts, or under NODE_SCRATCH (node-local storage, in the site config) with" \
            "$1 naming its squashfs image, which each node then unpacks"
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

# Slurm sends SIGTERM to every process of the job, the tasks included: they checkpoint on their own. Passing it on
# to srun would make srun kill the step, mid-checkpoint.
on_terminate() {
    log "SIGTERM (preemption, requeue or cancel): the tasks received it too, and checkpoint and stop"
}

# requeue WHY: a bounded number of times (MAX_REQUEUES): a job warned soon after every start would otherwise
# churn through the queue without end.
requeue() {
    local restarts=${SLURM_RESTART_COUNT:-0} max=${MAX_REQUEUES:-20}
    if (( restarts >= max )); then
        log "error: $1, but job $SLURM_JOB_ID has already run $(( restarts + 1 )) time(s) (MAX_REQUEUES=$max):" \
            "not requeueing it again. Its checkpoint is kept: submit the same script again to continue from it," \
            "with a longer --time if the time limit is what stopped it each time"
        exit 75
    fi
    log "$1: requeueing job $SLURM_JOB_ID (restart $(( restarts + 1 )) of at most $max)"
    scontrol requeue "$SLURM_JOB_ID" || die "scontrol requeue $SLURM_JOB_ID failed"
    exit 0
}

# The rendezvous address of a multi-task step: the job's first node, found here on the host, because the tasks
# may run in a CONTAINER without Slurm's commands. A node name that does not resolve gives its NodeAddr.
rendezvous_host() {
    local first
    first=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1) || return 1
    if getent hosts "$first" >/dev/null; then
        echo "$first"
    else
        scontrol show node -o "$first" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2
    fi
}

# The tasks' rendezvous, from this job every time: a MASTER_ADDR or MASTER_PORT left in the submitting shell, which
# sbatch exports, would send every task to another host or onto another job's port. Only the site config's
# RENDEZVOUS_ADDR / RENDEZVOUS_PORT override it; the tasks read these two (moco/runtime/distributed.py), never MASTER_*.
export_rendezvous() {
    RENDEZVOUS_ADDR=${RENDEZVOUS_ADDR:-$(rendezvous_host)} && [[ -n $RENDEZVOUS_ADDR ]] || die "no address for" \
        "the first node of $SLURM_JOB_NODELIST (scontrol show hostnames / show node): set RENDEZVOUS_ADDR in the" \
        "site config"
    # moco.runtime.distributed.slurm_port's: fixed by the job id, below Linux's ephemeral ports
    RENDEZVOUS_PORT=${RENDEZVOUS_PORT:-$(( 20000 + SLURM_JOB_ID % 12768 ))}
    export RENDEZVOUS_ADDR RENDEZVOUS_PORT
}

# count_gpus: GPU_COUNT, the GPUs this job has on this node, and GPU_SOURCE, the variable that said so. Slurm
# versions and gres setups differ in which of these they set: a count, lists of indices, the request per node
# ("[type:]4", "gres/gpu:4", "gres:gpu:type:4"). CUDA_VISIBLE_DEVICES comes last: it may be the submitting shell's.
count_gpus() {
    local name value item n
    GPU_COUNT=0 GPU_SOURCE=
    for name in SLURM_GPUS_ON_NODE SLURM_STEP_GPUS SLURM_JOB_GPUS SLURM_GPUS_PER_NODE SLURM_TRES_PER_NODE \
            CUDA_VISIBLE_DEVICES; do
        value=${!name:-}
        [[ -n $value && $value != NoDevFiles && $value != -1 ]] || continue
        n=0
        case $name in
            SLURM_GPUS_ON_NODE) [[ $value =~ ^[0-9]+$ ]] && n=$value ;;
            SLURM_GPUS_PER_NODE)  # [type:]count[,[type:]count...]
                for item in ${value//,/ }; do [[ ${item##*:} =~ ^[0-9]+$ ]] && (( n += ${item##*:} )); done ;;
            SLURM_TRES_PER_NODE)  # cpu:6,gres/gpu:4 or gres:gpu:v100:4
                for item in ${value//,/ }; do
                    [[ $item =~ ^gres[/:]gpu(:[^:]+)?[:=]([0-9]+)$ ]] && (( n += BASH_REMATCH[2] ))
                done ;;
            *)  # indices or UUIDs, ranges such as 0-3 counted whole
                for item in ${value//,/ }; do
                    if [[ $item =~ ^([0-9]+)-([0-9]+)$ ]]; then
                        (( n += BASH_REMATCH[2] - BASH_REMATCH[1] + 1 ))
                    else
                        (( n += 1 ))
                    fi
                done ;;
        esac
        if (( n > 0 )); then
            GPU_COUNT=$n GPU_SOURCE="$name=$value"
            return 0
        fi
        [[ $name == SLURM_GPUS_ON_NODE && $value == 0 ]] && return 0  # Slurm said: none
    done
    return 0
}

# on_every_node COMMAND...: COMMAND once on every node of the job, all at once, as a step of one task a node; it
# fails when COMMAND fails on any node (srun's error line names it). The step asks for the node's GPUs by count:
# otherwise it would inherit a per-task request of the job (--gpus-per-task) and see only some of them.
on_every_node() {
    local nodes=${SLURM_JOB_NUM_NODES:-1} gres=()
    count_gpus
    (( GPU_COUNT > 0 )) && gres=(--gres=gpu:"$GPU_COUNT")
    srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 "${gres[@]}" "$@"
}

run_tasks() {
    # A warning during data staging: requeue now rather than start work that cannot finish.
    (( WARNED )) && requeue "time limit near before the tasks started"
    # One task per GPU; without GPUs (--gres=none) one per node. TASKS_PER_NODE overrides both.
    count_gpus
    local per_node=${TASKS_PER_NODE:-$(( GPU_COUNT > 0 ? GPU_COUNT : 1 ))}
    local why="one per GPU, $GPU_SOURCE"
    [[ -n $GPU_SOURCE ]] || why="no GPU allocated"
    [[ -n ${TASKS_PER_NODE:-} ]] && why=TASKS_PER_NODE
    log "tasks per node: $per_node ($why)"
    # CPUs a task: the allocation's share, but never more than the cores this node really lets the job use
    # (oversubscribed BLAS threads crawl; a test cluster may declare more CPUs than it has).
    local cores
    cores=$(nproc)
    (( ${SLURM_CPUS_ON_NODE:-1} < cores )) && cores=${SLURM_CPUS_ON_NODE:-1}
    local cpus=$(( cores / per_node ))
    (( cpus > 0 )) || cpus=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$cpus}
    local meet=
    if (( per_node * ${SLURM_JOB_NUM_NODES:-1} > 1 )); then
        export_rendezvous
        meet=", rendezvous at $RENDEZVOUS_ADDR:$RENDEZVOUS_PORT"
    fi
    log "srun: ${SLURM_JOB_NUM_NODES:-1} node(s) x $per_node task(s), $cpus CPU(s) each$meet:" \
        "${CONTAINER:+$CONTAINER }$TASK_PYTHON $*"
    # shellcheck disable=SC2086  # CONTAINER is a command prefix, split on purpose
    srun --ntasks-per-node="$per_node" --cpus-per-task="$cpus" --kill-on-bad-exit=1 \
        $CONTAINER "$TASK_PYTHON" "$@" &
    TASKS_PID=$!
    while kill -0 "$TASKS_PID" 2>/dev/null; do
        wait "$TASKS_PID"  # returns early when a trap runs
    done
    wait "$TASKS_PID"
    local status=$?
    TASKS_PID=
    # 75: checkpointed, not finished (moco/runtime/preemption.py)
    (( status == 75 && WARNED )) && requeue "checkpoint saved"
    log "tasks ended with status $status"
    return "$status"
}
