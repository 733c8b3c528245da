#!/usr/bin/env bash
# Show the trainer's log from the TPU workers (each worker writes its own).
#
# Usage: launch/tpu/logs.sh [--dry-run] [--worker=N|all] [--follow] [--lines=N]
#   --worker=N   worker number (default 0, the one that logs metrics) or all
#   --follow     keep printing new lines (tail -F) until Ctrl-C; the trainer keeps running
#   --lines=N    how many last lines to print first (default 100)
#   --dry-run    print the command instead of running it (also DRY_RUN=1)
# Settings: PROJECT, ZONE, TPU_NAME, REMOTE_LOG_DIR: see launch/tpu/common.sh.
# Metrics and TensorBoard files go to the workdir on GCS; see docs/tpu.md.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

tpu_parse_args "$@"
tpu_no_pass_args
worker=0
follow=""
lines=100
for a in ${ARGS[@]+"${ARGS[@]}"}; do
  case "$a" in
    --worker=*) worker="${a#--worker=}" ;;
    --follow | -f) follow=" -F" ;;
    --lines=*) lines="${a#--lines=}" ;;
    *) die "unknown argument: $a (see --help)" ;;
  esac
done
[[ "$worker" =~ ^([0-9]+|all)$ ]] || die "--worker=$worker: expected a worker number or all"
[[ "$lines" =~ ^[0-9]+$ ]] || die "--lines=$lines: expected a number"
tpu_require_base
tpu_set_loc

tpu_ssh "$worker" "tail -n $lines$follow \$HOME/$REMOTE_LOG_DIR/train.log"
