#!/usr/bin/env bash
# Train on one machine with all its local GPUs: one process, jax sees every GPU.
#
# Usage: launch/gpu/single_node.sh [--dry-run] [--] [trainer args...]
#   trainer args  passed on, e.g. --config.batch_size=768 --config.mesh.fsdp=8, or --dry_run
#                 (the trainer's own flag: compile the sharded step, print per-device memory)
#   --dry-run     print the command instead of running it (also DRY_RUN=1)
# Settings (environment):
#   CONFIG        default configs/d16.py
#   RUN_NAME      default: the config's file name without .py
#   WORKDIR       default ./workdir/$RUN_NAME in the repository (git-ignored); gs:// works too.
#                 Started again with the same WORKDIR, the trainer resumes from its last checkpoint.
#   PYTHON        default: the repository's .venv/bin/python if present, else python3
#   TRAIN_MODULE  default var_jax.train
#   CUDA_VISIBLE_DEVICES  restricts the GPUs used, as usual
# Install once (GPU wheels on top of the pinned CPU requirements):
#   python3.11 -m venv .venv && . .venv/bin/activate
#   pip install -r requirements.txt "jax[cuda12]==0.10.2"
set -euo pipefail
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

trainer_args=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) vj_usage "$0"; exit 0 ;;
    --) shift; trainer_args+=("$@"); break ;;
    *) trainer_args+=("$1") ;;
  esac
  shift
done

CONFIG="${CONFIG:-configs/d16.py}"
RUN_NAME="${RUN_NAME:-$(basename "$CONFIG" .py)}"
WORKDIR="${WORKDIR:-$VJ_REPO_ROOT/workdir/$RUN_NAME}"
TRAIN_MODULE="${TRAIN_MODULE:-var_jax.train}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$VJ_REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$VJ_REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi

cd "$VJ_REPO_ROOT"
note "one process on the local GPUs: $CONFIG -> $WORKDIR"
# A single process: keep var_jax.parallel.distributed from initialising a multi-process run when this
# is started inside a SLURM allocation with several tasks or a shell with VAR_JAX_MULTIHOST set.
run env -u VAR_JAX_MULTIHOST -u SLURM_NTASKS -u JAX_COORDINATOR_ADDRESS \
  "$PYTHON" -m "$TRAIN_MODULE" "--config=$CONFIG" "--workdir=$WORKDIR" ${trainer_args[@]+"${trainer_args[@]}"}
