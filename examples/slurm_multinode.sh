#!/bin/bash
# Multi-node training under SLURM: one task per node, each running torchrun for the GPUs of its node.
#   sbatch examples/slurm_multinode.sh [CONFIG.yaml] [key=value ...]
# output_dir must be on a file system every node can read (checkpoints are written by rank 0 and read by all).
#SBATCH --job-name=rlhf-time-sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out

set -euo pipefail

config=${1:-examples/sft_full.yaml}
shift || true
gpus_per_node=${SLURM_GPUS_ON_NODE:-8}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# The same command on every node; torchrun's c10d rendezvous on the first node assigns the ranks.
# Add resume_from_checkpoint=latest to continue a pre-empted job (on any number of nodes).
srun torchrun \
    --nnodes "$SLURM_NNODES" \
    --nproc_per_node "$gpus_per_node" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$head_node:29500" \
    --rdzv_id "$SLURM_JOB_ID" \
    -m rlhf_time train "$config" distributed=fsdp "$@"
