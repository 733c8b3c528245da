#!/usr/bin/env bash
# Start the trainer on every worker of the TPU slice, detached (nohup + setsid, log on each
# worker), so a dropped ssh connection does not stop it. Idempotent: a worker whose trainer
# is still running is left alone. Started again with the same WORKDIR, the trainer resumes
# from its last checkpoint there.
#
# Usage: launch/tpu/train.sh [--dry-run] [--foreground|--restart|--stop] [--] [trainer args...]
#   trainer args  passed on, e.g. --config.batch_size=768 --config.mesh.fsdp=8, or --dry_run
#                 (the trainer's own flag: compile the sharded step, print per-device memory)
#   --foreground  stay attached and stream the output (for --dry_run or a short test);
#                 ends when ssh drops
#   --restart     stop a running trainer first (SIGTERM: it saves a checkpoint; SIGKILL after
#                 STOP_TIMEOUT seconds, default 600), then start it again (e.g. new arguments)
#   --stop        only stop it (same SIGTERM, then SIGKILL)
#   --dry-run     print the commands instead of running them (also DRY_RUN=1)
# Settings: CONFIG (default configs/d16.py), BUCKET or WORKDIR (gs://...), RUN_NAME,
# TRAIN_MODULE, REMOTE_ENV, and PROJECT, ZONE, TPU_NAME, ...: see launch/tpu/common.sh.
# Logs: launch/tpu/logs.sh (on each worker: ~/$REMOTE_LOG_DIR/train.log).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

tpu_parse_args "$@"
foreground=0
stop=0
start=1
trainer_args=()
for a in ${ARGS[@]+"${ARGS[@]}"}; do
  case "$a" in
    --foreground) foreground=1 ;;
    --restart) stop=1 ;;
    --stop) stop=1 start=0 ;;
    *) trainer_args+=("$a") ;;
  esac
done
trainer_args+=(${PASS_ARGS[@]+"${PASS_ARGS[@]}"})
tpu_require_base
tpu_resolve_workdir
tpu_set_loc

code="\$HOME/$REMOTE_DIR"
logs="\$HOME/$REMOTE_LOG_DIR"
pidfile="$logs/train.pid"
logfile="$logs/train.log"
trainer="env VAR_JAX_MULTIHOST=1${REMOTE_ENV:+ $REMOTE_ENV} python -m $TRAIN_MODULE $(vj_quote "--config=$CONFIG" "--workdir=$WORKDIR" ${trainer_args[@]+"${trainer_args[@]}"})"
stop_timeout="${STOP_TIMEOUT:-600}"
[[ "$stop_timeout" =~ ^[0-9]+$ ]] || die "STOP_TIMEOUT=$stop_timeout is not a number of seconds"
stop_cmd="if [ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null; then p=\$(cat $pidfile); echo \"\$(hostname): stopping trainer pid \$p\"; kill -TERM \$p; for i in \$(seq $stop_timeout); do kill -0 \$p 2>/dev/null || break; sleep 1; done; kill -KILL \$p 2>/dev/null || true; fi; rm -f $pidfile"
stamp="echo \"=== \$(date -u +%Y-%m-%dT%H:%M:%SZ) start on \$(hostname): $TRAIN_MODULE $CONFIG -> $WORKDIR\" >> $logfile"

if ((stop && !start)); then
  note "stopping the trainer on $TPU_NAME (it saves a checkpoint on SIGTERM)"
  tpu_ssh all "$stop_cmd"
  exit 0
fi
prefix=""
if ((stop)); then prefix="$stop_cmd; "; fi
note "training $CONFIG on $TPU_NAME ($TPU_TYPE), workdir $WORKDIR"
if ((foreground)); then
  tpu_ssh all "set -o pipefail; mkdir -p $logs && cd $code && . \$HOME/$REMOTE_VENV/bin/activate && $stamp && $trainer 2>&1 | tee -a $logfile"
else
  tpu_ssh all "$prefix""mkdir -p $logs && cd $code && if [ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null; then echo \"\$(hostname): trainer already running (pid \$(cat $pidfile)), not starting another\"; else . \$HOME/$REMOTE_VENV/bin/activate && $stamp && { nohup setsid $trainer >> $logfile 2>&1 < /dev/null & echo \$! > $pidfile; } && echo \"\$(hostname): started trainer, pid \$(cat $pidfile)\"; fi"
  note "started in the background; follow it with launch/tpu/logs.sh --follow, check it with launch/tpu/status.sh"
fi
