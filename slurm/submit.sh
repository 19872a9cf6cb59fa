#!/bin/bash
# Submit job scripts of slurm/ with the site config's account and partitions, each after the one before
# (afterok); print "<script> <job id>" for each. A job that fails cancels the ones after it.
#
#   slurm/submit.sh moco_v2 demo_mocov2_fpn_r1 demo_mocov2_fpn_r2 demo_mocov2_fpn_r3 eval_mocov2_fpn
#   slurm/submit.sh --after 1234 demo_mocov2_fpn_r2 -- --time=1:00:00     (options after -- go to every sbatch)
#
# `make pipeline` runs the first line. Knobs travel in the environment: R1_EPOCHS=2 slurm/submit.sh ...
# Each submission is a run of its own: RUN_NAME is the date and time unless RUN_NAME or RUN_DIR is set (to add
# stages to an existing run, set it). Slurm's own output of each job goes to LOG_DIR, beside the job's log.
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=common.sh
source "$REPO/slurm/common.sh"
[[ -n ${RUN_NAME:-} || -n ${RUN_DIR:-} ]] || { RUN_NAME=$(date +%Y%m%d-%H%M%S); export RUN_NAME; }
load_config >&2
export RUN_DIR  # the jobs read this one run, whatever the config would derive at their start
LOG_DIR=${LOG_DIR:-$REPO/slurm/logs}
mkdir -p "$LOG_DIR"
log "run directory: $RUN_DIR" >&2

after="" names=()
while (( $# )); do
    case $1 in
        --after) after=$2; shift 2 ;;
        --) shift; break ;;
        *) names+=("${1%.slurm}"); shift ;;
    esac
done
(( ${#names[@]} )) || die "usage: $0 [--after JOBID] SCRIPT... [-- SBATCH_OPTIONS...]"

cd "$REPO/slurm"  # the jobs find the repository from the submit directory
for name in "${names[@]}"; do
    case $name in
        moco_v2) partition=$PRETRAIN_PARTITION ;;
        demo_mocov2_fpn_r[123]) partition=$FINETUNE_PARTITION ;;
        eval_mocov2_fpn) partition=$EVAL_PARTITION ;;
        *) die "$name: not a job script of slurm/" ;;
    esac
    # shellcheck disable=SC2086  # SBATCH_EXTRA is a list of options
    id=$(sbatch --parsable --partition="$partition" ${ACCOUNT:+--account="$ACCOUNT"} \
        --output="$LOG_DIR/%x_%j.slurm.out" ${after:+--dependency=afterok:$after --kill-on-invalid-dep=yes} \
        $SBATCH_EXTRA "$@" "$name.slurm")
    after=${id%%;*}
    echo "$name $after"
done
