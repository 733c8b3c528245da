#!/usr/bin/env bash
# Rehearse a multi-host run on this machine: N CPU processes on localhost, coordinated by
# jax.distributed exactly as the hosts of a TPU slice or GPU cluster are (one process per
# host, each with DEVICES_PER_PROCESS devices).
#
# Usage: launch/local_multiprocess.sh [--dry-run] N [--] [trainer args...]
#   N             number of processes (ranks)
#   trainer args  passed on to every rank, e.g. --config.batch_size=8 --config.mesh.fsdp=2
#   --dry-run     print the N commands instead of running them (also DRY_RUN=1)
# Settings (environment):
#   DEVICES_PER_PROCESS  CPU devices per process (--xla_force_host_platform_device_count), default 1
#   CONFIG        default configs/tiny.py
#   WORKDIR       default ./workdir/local_multiprocess in the repository (git-ignored); the same
#                 WORKDIR again resumes from its last checkpoint
#   PORT          coordinator port on 127.0.0.1 (default: a free one)
#   PYTHON        default: the repository's .venv/bin/python if present, else python3
#   TRAIN_MODULE  default var_jax.train
#   KILL_GRACE    seconds between SIGTERM and SIGKILL when stopping the ranks (default 10)
# Each rank's output is prefixed with "[rank i] ". The script waits for all ranks; when one
# fails, it stops the others (SIGTERM, then SIGKILL) and exits with the failed rank's status.
# Status 75 means the ranks were stopped by a signal after saving a checkpoint: run again to resume
# (docs/reliability.md).
# Everything binds to 127.0.0.1 (JAX_COORDINATOR_BIND_ADDRESS).
set -euo pipefail
# shellcheck source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

nproc=""
trainer_args=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) vj_usage "$0"; exit 0 ;;
    --) shift; trainer_args+=("$@"); break ;;
    *)
      if [[ -z "$nproc" ]]; then nproc="$1"; else trainer_args+=("$1"); fi
      ;;
  esac
  shift
done
[[ -n "$nproc" ]] || die "missing N, the number of processes (usage: local_multiprocess.sh [--dry-run] N [trainer args...])"
[[ "$nproc" =~ ^[1-9][0-9]*$ ]] || die "N=$nproc is not a positive number of processes"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
[[ "$DEVICES_PER_PROCESS" =~ ^[1-9][0-9]*$ ]] || die "DEVICES_PER_PROCESS=$DEVICES_PER_PROCESS is not a positive number"
KILL_GRACE="${KILL_GRACE:-10}"
[[ "$KILL_GRACE" =~ ^[0-9]+$ ]] || die "KILL_GRACE=$KILL_GRACE is not a number of seconds"

CONFIG="${CONFIG:-configs/tiny.py}"
WORKDIR="${WORKDIR:-$VJ_REPO_ROOT/workdir/local_multiprocess}"
TRAIN_MODULE="${TRAIN_MODULE:-var_jax.train}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$VJ_REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$VJ_REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "${PORT:-}" ]]; then
  # A port free now; the coordinator (rank 0) binds it a moment later.
  PORT="$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')" ||
    die "could not pick a free port with $PYTHON: set PORT"
fi
[[ "$PORT" =~ ^[0-9]+$ ]] || die "PORT=$PORT is not a port number"
coordinator="127.0.0.1:$PORT"
xla_flags="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"

cd "$VJ_REPO_ROOT"
rank_cmd() {
  cmd=(env JAX_PLATFORMS=cpu "JAX_COORDINATOR_ADDRESS=$coordinator" "JAX_COORDINATOR_BIND_ADDRESS=$coordinator"
    "JAX_NUM_PROCESSES=$nproc" "JAX_PROCESS_ID=$1" "XLA_FLAGS=$xla_flags" PYTHONUNBUFFERED=1
    "$PYTHON" -m "$TRAIN_MODULE" "--config=$CONFIG" "--workdir=$WORKDIR" ${trainer_args[@]+"${trainer_args[@]}"})
}

note "$nproc processes x $DEVICES_PER_PROCESS CPU devices, coordinator $coordinator: $CONFIG -> $WORKDIR"
if vj_dry_run; then
  for ((i = 0; i < nproc; i++)); do
    rank_cmd "$i"
    run "${cmd[@]}"
  done
  exit 0
fi

pids=()
stopping=0
ticks_left=0 # 0.2 s ticks between SIGTERM and SIGKILL
killed=0
stop_all() {
  local p
  ((stopping)) && return 0
  stopping=1
  ticks_left=$((KILL_GRACE * 5))
  for p in ${pids[@]+"${pids[@]}"}; do
    [[ -n "$p" ]] && kill -TERM -- "-$p" 2>/dev/null || true
  done
}
kill_all() {
  local p
  for p in ${pids[@]+"${pids[@]}"}; do
    [[ -n "$p" ]] && kill -KILL -- "-$p" 2>/dev/null || true
  done
}
failed=""
rc=0
on_signal() {
  if [[ -z "$failed" ]]; then failed=signal rc="$1"; fi
  stop_all
}
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap kill_all EXIT

for ((i = 0; i < nproc; i++)); do
  rank_cmd "$i"
  printf '[rank %d] + %s\n' "$i" "$(vj_quote "${cmd[@]}")" >&2
  # Job control on while forking: each rank (its python and its output prefixer) gets a process
  # group of its own, so stopping a rank stops all of it, and a Ctrl-C in the terminal reaches
  # only this script, which then stops them all. Off again inside and after (no job messages).
  set -m
  (
    set +m -o pipefail
    # On SIGTERM the rank's python saves a checkpoint: this subshell (whose status is the
    # python's) and the prefixer (which prints its last words) outlive it, not die first.
    trap true TERM
    "${cmd[@]}" 2>&1 | {
      trap '' TERM
      while IFS= read -r line || [[ -n "$line" ]]; do printf '[rank %d] %s\n' "$i" "$line"; done
    }
  ) &
  pids+=("$!")
  set +m
done

remaining=$nproc
# bash reports a rank killed by a signal with a multi-line "Killed (...)" job message on stderr;
# the loop's stderr is dropped for that, and its own messages go to fd 3 (the real stderr).
exec 3>&2
{
  while ((remaining > 0)); do
    for i in "${!pids[@]}"; do
      pid="${pids[i]}"
      [[ -n "$pid" ]] || continue
      kill -0 "$pid" 2>/dev/null && continue
      status=0
      wait "$pid" || status=$?
      pids[i]=""
      remaining=$((remaining - 1))
      if ((status != 0)) && [[ -z "$failed" ]]; then
        failed="$i" rc="$status"
        if ((status == 75)); then
          printf '# rank %d stopped by a signal after saving (status 75)\n' "$i" >&3
        else
          printf '# rank %d exited with status %d: stopping the other ranks\n' "$i" "$status" >&3
        fi
        stop_all
      fi
    done
    if ((stopping && !killed)) && ((ticks_left-- <= 0)); then
      printf '# ranks still running %d s after SIGTERM: SIGKILL\n' "$KILL_GRACE" >&3
      killed=1
      kill_all
    fi
    if ((remaining > 0)); then sleep 0.2; fi
  done
} 2>/dev/null
trap - EXIT

if [[ -n "$failed" ]]; then
  if [[ "$failed" == signal ]]; then
    printf '# interrupted: all ranks stopped\n' >&2
  elif ((rc == 75)); then
    printf '# stopped by a signal with a checkpoint saved (status 75): run the same command to resume\n' >&2
  else
    printf '# rank %s failed with status %d\n' "$failed" "$rc" >&2
  fi
  exit "$rc"
fi
printf '# all %d ranks finished\n' "$nproc" >&2
