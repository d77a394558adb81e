#!/bin/bash
# Fine-tune on SLURM: one `accelerate launch` per node (started by srun), each spawning one
# process per GPU; node 0 is the rendezvous host.
#   sbatch launch/slurm.sh --config configs/instruct.yaml train.epochs=2      # arguments: as gptft finetune
# Adjust --nodes, --gres and GPUS_PER_NODE to your cluster (and activate your environment below).
#SBATCH --job-name=gptft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1            # one launcher per node; it starts the per-GPU processes
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_PROCESS_IP=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
MAIN_PROCESS_PORT=${MAIN_PROCESS_PORT:-29500}
NUM_PROCESSES=$((SLURM_NNODES * GPUS_PER_NODE))   # all GPUs of all nodes
CONFIG_FILE=${ACCELERATE_CONFIG:-configs/accelerate/multi-node.yaml}   # or configs/accelerate/fsdp.yaml

# source .venv/bin/activate
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

echo "nodes: $SLURM_NNODES, processes: $NUM_PROCESSES, main: $MAIN_PROCESS_IP:$MAIN_PROCESS_PORT"

# Single quotes: $SLURM_NODEID is expanded by each srun task, on its own node (0, 1, ...).
# --cpus-per-task again: srun of Slurm 22.05 and later does not inherit it from sbatch (the
# launcher and its processes would share one core).
srun --ntasks="$SLURM_NNODES" --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" bash -c '
  accelerate launch \
    --config_file "'"$CONFIG_FILE"'" \
    --num_machines "$SLURM_NNODES" \
    --num_processes "'"$NUM_PROCESSES"'" \
    --machine_rank "$SLURM_NODEID" \
    --main_process_ip "'"$MAIN_PROCESS_IP"'" \
    --main_process_port "'"$MAIN_PROCESS_PORT"'" \
    --rdzv_backend static \
    launch/finetune.py "$@"
' gptft-launch "$@"
