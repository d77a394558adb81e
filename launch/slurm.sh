#!/bin/bash
# Fine-tune on SLURM: one `accelerate launch` per node (started by srun), each spawning one
# process per GPU; node 0 is the rendezvous host.
#   sbatch launch/slurm.sh --config configs/instruct.yaml train.epochs=2      # arguments: as gptft finetune
# Adjust --nodes, --gres and GPUS_PER_NODE to your cluster (and activate your environment below).
# Five minutes before the time limit SLURM sends SIGUSR1 to this script, which passes it to the
# training processes: they finish their step, save a checkpoint and stop (exit status 75); the job
# is then requeued and resumes from it (train.resume=true on a restart). Preemption (SIGTERM to
# every process) saves the same way.
#SBATCH --job-name=gptft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1            # one launcher per node; it starts the per-GPU processes
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=B:USR1@300            # SIGUSR1 to this script 300 s before the time limit
#SBATCH --requeue

set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))   # all GPUs of all nodes
CONFIG_FILE=${ACCELERATE_CONFIG:-configs/accelerate/multi-node.yaml}   # or configs/accelerate/fsdp.yaml

# source .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

RESUME=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then   # a requeued job continues from its checkpoint
  RESUME=(train.resume=true)
fi

echo "nodes: $SLURM_NNODES, processes: $NUM_PROCESSES, main: $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT"

# The time limit is near: ask every training process (step 0 is the srun below) to save and stop.
STOPPING=0
trap 'STOPPING=1; echo "time limit near: the run saves a checkpoint and stops"; scancel --signal=USR1 "$SLURM_JOB_ID.0"' USR1

# Single quotes: $SLURM_NODEID is expanded by each srun task, on its own node (0, 1, ...).
# --cpus-per-task again: srun of Slurm 22.05 and later does not inherit it from sbatch (the
# launcher and its processes would share one core). The launcher ignores SIGUSR1 (trap ''): only
# the training processes act on it (gptft installs its own handler), the launcher waits for them.
# In the background, so that this script's trap runs while srun is still going.
srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" bash -c '
  trap "" USR1
  exec accelerate launch \
    --config_file "'"$CONFIG_FILE"'" \
    --num_machines "$SLURM_NNODES" \
    --num_processes "'"$NUM_PROCESSES"'" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "'"$MAIN_PROCESS_IP"'" \
    --main_process_port "'"$MAIN_PROCESS_PORT"'" \
    --rdzv_backend static \
    launch/finetune.py "$@"
' gptft-launch "$@" ${RESUME[@]+"${RESUME[@]}"} &
SRUN=$!
STATUS=0
until wait "$SRUN"; do         # a trapped signal ends `wait` early: wait again for srun itself
  STATUS=$?
  kill -0 "$SRUN" 2>/dev/null || break
done

if [ "$STOPPING" = 1 ]; then
  echo "requeueing job $SLURM_JOB_ID: it resumes from its checkpoint"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
exit "$STATUS"
