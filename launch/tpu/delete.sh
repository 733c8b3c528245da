#!/usr/bin/env bash
# Delete the TPU slice (the queued resource and its TPU VMs) to stop paying for it.
# The workdir on GCS (checkpoints, TensorBoard files) is kept; the logs on the workers are not
# (copy them first with logs.sh if needed).
#
# Usage: launch/tpu/delete.sh [--dry-run] [--yes] [--async]
#   --yes      do not ask for confirmation (gcloud --quiet)
#   --async    return without waiting for the deletion to finish
#   --dry-run  print the command instead of running it (also DRY_RUN=1)
# Settings: PROJECT, ZONE, QR_NAME (or TPU_NAME/TPU_TYPE it derives from): see common.sh.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

tpu_parse_args "$@"
tpu_no_pass_args
flags=()
for a in ${ARGS[@]+"${ARGS[@]}"}; do
  case "$a" in
    --yes | -y) flags+=(--quiet) ;;
    --async) flags+=(--async) ;;
    *) die "unknown argument: $a (see --help)" ;;
  esac
done
tpu_require_base
tpu_set_loc

note "deleting queued resource $QR_NAME and TPU $TPU_NAME (the workdir on GCS is kept)"
tpu_delete_cmd ${flags[@]+"${flags[@]}"}
