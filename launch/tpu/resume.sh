#!/usr/bin/env bash
# Bring a run back after a spot preemption (or start it from nothing): make the slice exist,
# set it up and start the trainer, which resumes from the last checkpoint in WORKDIR.
# Safe to run at any time:
#   queued resource missing            -> create.sh --wait, setup.sh, train.sh
#   SUSPENDED / FAILED (preempted)     -> delete.sh --yes, then as above
#   waiting / provisioning             -> wait for ACTIVE, setup.sh, train.sh
#   ACTIVE, trainer stopped            -> setup.sh, train.sh
#   ACTIVE, trainer running everywhere -> nothing
#   ACTIVE, running on some workers    -> train.sh --restart (a lost worker stalls the others)
#
# Usage: launch/tpu/resume.sh [--dry-run] [--watch] [--] [trainer args...]
#   --watch    keep going: check every WATCH_SECONDS (default 600) and resume after each
#              preemption; stops when the trainer is found stopped on an ACTIVE slice
#              (finished or crashed: see logs.sh; nothing is restarted in a loop)
#   --dry-run  print the commands instead of running them (also DRY_RUN=1); the states it
#              cannot query are assumed: DRY_RUN_STATE (default SUSPENDED), DRY_RUN_TRAINING
# trainer args are passed to train.sh (use the same ones as for the first start).
# Settings: as for create.sh, setup.sh and train.sh (see launch/tpu/common.sh).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

tpu_parse_args "$@"
watch=0
trainer_args=()
for a in ${ARGS[@]+"${ARGS[@]}"}; do
  case "$a" in
    --watch) watch=1 ;;
    *) trainer_args+=("$a") ;;
  esac
done
trainer_args+=(${PASS_ARGS[@]+"${PASS_ARGS[@]}"})
tpu_require_base
tpu_resolve_workdir
tpu_set_loc
export DRY_RUN="${DRY_RUN:-0}" WORKDIR
here="$(dirname "${BASH_SOURCE[0]}")"
# The dry-run assumption is for this script's own query; the scripts it calls keep theirs.
assumed_state="${DRY_RUN_STATE:-SUSPENDED}"
unset DRY_RUN_STATE
watch_seconds="${WATCH_SECONDS:-600}"

setup_and_train() {
  "$here/setup.sh"
  "$here/train.sh" -- ${trainer_args[@]+"${trainer_args[@]}"}
}

# One pass; sets finished=1 when there is nothing left to watch. (Called plainly, not in an
# `if`/`||`, so that `set -e` still stops everything at the first failing command.)
finished=0
resume_once() {
  local first="$1"
  tpu_qr_state "$assumed_state"
  case "$QR_STATE" in
    NOT_FOUND)
      note "no slice: creating it"
      "$here/create.sh" --wait
      setup_and_train
      ;;
    SUSPENDED | SUSPENDING | FAILED)
      note "slice was preempted or failed ($QR_STATE): deleting and re-creating it"
      "$here/delete.sh" --yes
      "$here/create.sh" --wait
      setup_and_train
      ;;
    DELETING)
      note "slice is being deleted: creating it again once it is gone"
      if ! vj_dry_run; then
        while tpu_qr_state NOT_FOUND && [[ "$QR_STATE" == DELETING ]]; do sleep "$POLL_SECONDS"; done
      fi
      "$here/create.sh" --wait
      setup_and_train
      ;;
    ACTIVE)
      tpu_training_state
      case "$TRAINING" in
        running) note "trainer is running on every worker" ;;
        mixed)
          note "trainer runs on some workers only: restarting it everywhere"
          "$here/train.sh" --restart -- ${trainer_args[@]+"${trainer_args[@]}"}
          ;;
        *)
          if ((first)); then
            setup_and_train
          else
            note "trainer is not running on the ACTIVE slice (finished or crashed): see logs.sh; stop watching"
            finished=1
          fi
          ;;
      esac
      ;;
    *)
      note "slice is $QR_STATE: waiting for it"
      tpu_wait_active
      setup_and_train
      ;;
  esac
}

first=1
while :; do
  resume_once "$first"
  first=0
  ((watch && !finished)) || exit 0
  if vj_dry_run; then
    note "--watch: the check above repeats every $watch_seconds s"
    exit 0
  fi
  sleep "$watch_seconds"
done
