# Requeue and resume: a fragment that `bihm submit slurm` puts into both sbatch templates.
#
# The job is requeueable (#SBATCH --requeue): a preemption, a node failure or `scontrol
# requeue` ends it with SIGTERM and starts this script again later, with
# SLURM_RESTART_COUNT > 0. `bihm train` stops at the next batch end on SIGTERM and exits
# 143, its last.ckpt the resume point; the restarted job then adds --resume, so the run
# continues from that checkpoint (a first start never does: a used run folder is an error).
#
# SIGUSR1 reaches this script 90 s before the time limit (#SBATCH --signal=B:USR1@90, to
# this script only: srun's tasks never see it). It requeues the job if this allocation
# wrote a checkpoint, so the run goes on in a new allocation; if it wrote none, a new one
# would only train the same epoch again, and the job ends at its time limit instead.
RESULTS={{results}}
RESUME_FROM={{resume_from}}
job_started=$(date '+%Y-%m-%d %H:%M:%S')
resume=()
if ((${SLURM_RESTART_COUNT:-0} > 0)); then
    if [[ -e "$RESUME_FROM" ]]; then
        resume=(--resume)
        echo "bihm submit: restart ${SLURM_RESTART_COUNT} of job $SLURM_JOB_ID: continuing from $RESUME_FROM"
    else
        echo "bihm submit: restart ${SLURM_RESTART_COUNT} of job $SLURM_JOB_ID: no $RESUME_FROM, starting over"
    fi
fi

requeue_before_time_limit() {
    if [[ -n "$(find "$RESULTS" -name '*.ckpt' -newermt "$job_started" -print -quit 2>/dev/null)" ]]; then
        echo "bihm submit: the time limit is near: requeueing job $SLURM_JOB_ID to continue from its checkpoint"
        scontrol requeue "$SLURM_JOB_ID" ||
            echo "bihm submit: error: scontrol requeue $SLURM_JOB_ID failed; the job ends at its time limit" >&2
    else
        echo "bihm submit: the time limit is near, and this job wrote no checkpoint in $RESULTS:" \
            "not requeueing (it ends at its time limit; give it a longer --time)" >&2
    fi
}
trap requeue_before_time_limit USR1
