#!/usr/bin/env bash
# Where the run stands: queued-resource state, TPU VM state and health, whether the trainer
# is running on each worker (with the last log lines), and the checkpoints in the workdir.
#
# Usage: launch/tpu/status.sh [--dry-run]
#   --dry-run  print the commands instead of running them (also DRY_RUN=1)
# Settings: PROJECT, ZONE, TPU_NAME, QR_NAME, BUCKET/WORKDIR (optional here): see common.sh.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

tpu_parse_args "$@"
tpu_no_pass_args
((${#ARGS[@]} == 0)) || die "unknown argument: ${ARGS[0]} (see --help)"
tpu_require_base
tpu_set_loc

tpu_qr_state ACTIVE
vj_dry_run || echo "queued resource $QR_NAME ($TPU_TYPE, $CAPACITY): $QR_STATE"
if [[ "$QR_STATE" == ACTIVE ]]; then
  run "$GCLOUD" compute tpus tpu-vm describe "$TPU_NAME" "${tpu_loc[@]}" "--format=value(state,health)" || true
  tpu_ssh all "$(tpu_running_probe); tail -n ${STATUS_LINES:-3} \$HOME/$REMOTE_LOG_DIR/train.log 2>/dev/null || true" || true
fi
if [[ -n "$WORKDIR" || -n "$BUCKET" ]]; then
  tpu_resolve_workdir
  run "$GCLOUD" storage ls "$WORKDIR/" || true
fi
