#!/usr/bin/env bash
# Request a TPU slice as a queued resource (spot, reserved or on-demand).
#
# Usage: launch/tpu/create.sh [--dry-run] [--wait]
#   --wait     block until the queued resource is ACTIVE (polls every POLL_SECONDS)
#   --dry-run  print the gcloud commands instead of running them (also DRY_RUN=1)
# Settings (environment): PROJECT, ZONE, TPU_TYPE, TPU_NAME, QR_NAME, RUNTIME_VERSION,
# CAPACITY, CREATE_FLAGS; see launch/tpu/common.sh.
# Does nothing if the queued resource already exists and is usable; if it was preempted
# (SUSPENDED/FAILED) it says so: use resume.sh, which deletes and re-creates it.
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

tpu_parse_args "$@"
tpu_no_pass_args
wait_active=0
for a in ${ARGS[@]+"${ARGS[@]}"}; do
  case "$a" in
    --wait) wait_active=1 ;;
    *) die "unknown argument: $a (see --help)" ;;
  esac
done
tpu_require_base
tpu_set_loc

tpu_qr_state NOT_FOUND
case "$QR_STATE" in
  NOT_FOUND)
    note "requesting $TPU_TYPE ($CAPACITY) as queued resource $QR_NAME, node $TPU_NAME, runtime $RUNTIME_VERSION"
    tpu_create_cmd
    ;;
  FAILED | SUSPENDED | SUSPENDING)
    die "queued resource $QR_NAME exists but is $QR_STATE (preempted or failed): run launch/tpu/resume.sh to re-create it and continue training, or delete.sh"
    ;;
  *)
    note "queued resource $QR_NAME already exists ($QR_STATE); not creating it again"
    ;;
esac

if ((wait_active)); then
  tpu_wait_active
  note "$TPU_NAME is ACTIVE: next, launch/tpu/setup.sh"
fi
