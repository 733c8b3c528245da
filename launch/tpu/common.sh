# shellcheck shell=bash
# Settings shared by launch/tpu/*.sh (sourced, never run). Everything is an environment
# variable with a default where one makes sense; nothing in these files needs editing.
#
# Required
#   PROJECT           GCP project id
#   ZONE              zone that has the TPU type, e.g. us-central2-b (v4), us-west4-a (v5e)
#   BUCKET            GCS bucket (name, no gs://) for the workdir; needed by train.sh/resume.sh
#                     unless WORKDIR is given
# Slice
#   TPU_TYPE          accelerator type, default v4-32 (e.g. v5litepod-64, v5p-32, v6e-64)
#   TPU_NAME          TPU VM (node) name, default var-jax-$TPU_TYPE
#   QR_NAME           queued-resource id, default $TPU_NAME-qr
#   RUNTIME_VERSION   default from TPU_TYPE: v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
#                     v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
#   CAPACITY          spot (default) | reserved | on-demand
#   CREATE_FLAGS      extra words for `queued-resources create` (e.g. "--network=net
#                     --valid-until-duration=6h")
# Code on the workers
#   CODE_SOURCE       local (default: ship this checkout, uncommitted changes included) | git
#   REPO_URL, BRANCH  for CODE_SOURCE=git (BRANCH default main)
#   REMOTE_DIR        code directory on each worker, relative to $HOME (default var_jax)
#   REMOTE_VENV       virtualenv on each worker, relative to $HOME (default venvs/var_jax)
#   REMOTE_LOG_DIR    log directory on each worker, relative to $HOME (default var_jax_logs)
#   PYTHON_VERSION    default 3.11 (installed from the deadsnakes PPA when missing)
#   JAX_TPU_SPEC      default "jax[tpu]==0.10.2"; LIBTPU_FIND_LINKS the libtpu wheel index
#   EXTRA_PIP         extra pip requirements for the workers (default none); the gs:// packages
#                     come from requirements-gcs.txt
# Training
#   CONFIG            default configs/d16.py
#   RUN_NAME          default: the config's file name without .py (d16)
#   WORKDIR           default gs://$BUCKET/var_jax/$RUN_NAME; must be gs:// on a TPU slice
#   TRAIN_MODULE      default var_jax.train
#   REMOTE_ENV        extra VAR=value words put before the trainer on every worker
#                     (e.g. "LIBTPU_INIT_ARGS=--xla_tpu_enable_latency_hiding_scheduler=true")
# Tools
#   GCLOUD            gcloud binary (default gcloud)
#   DRY_RUN=1         print the commands instead of running them (same as --dry-run)
#   POLL_SECONDS      wait between state checks (default 30)

_vj_tpu_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=../lib.sh
source "$_vj_tpu_dir/../lib.sh"

PROJECT="${PROJECT:-}"
ZONE="${ZONE:-}"
BUCKET="${BUCKET:-}"
TPU_TYPE="${TPU_TYPE:-v4-32}"
TPU_NAME="${TPU_NAME:-var-jax-$TPU_TYPE}"
QR_NAME="${QR_NAME:-$TPU_NAME-qr}"
CAPACITY="${CAPACITY:-spot}"
CREATE_FLAGS="${CREATE_FLAGS:-}"
CODE_SOURCE="${CODE_SOURCE:-local}"
REPO_URL="${REPO_URL:-}"
BRANCH="${BRANCH:-main}"
REMOTE_DIR="${REMOTE_DIR:-var_jax}"
REMOTE_VENV="${REMOTE_VENV:-venvs/var_jax}"
REMOTE_LOG_DIR="${REMOTE_LOG_DIR:-var_jax_logs}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
JAX_TPU_SPEC="${JAX_TPU_SPEC:-jax[tpu]==0.10.2}"
LIBTPU_FIND_LINKS="${LIBTPU_FIND_LINKS:-https://storage.googleapis.com/jax-releases/libtpu_releases.html}"
EXTRA_PIP="${EXTRA_PIP:-}"
CONFIG="${CONFIG:-configs/d16.py}"
RUN_NAME="${RUN_NAME:-$(basename "$CONFIG" .py)}"
WORKDIR="${WORKDIR:-}"
TRAIN_MODULE="${TRAIN_MODULE:-var_jax.train}"
REMOTE_ENV="${REMOTE_ENV:-}"
GCLOUD="${GCLOUD:-gcloud}"
POLL_SECONDS="${POLL_SECONDS:-30}"

if [[ -z "${RUNTIME_VERSION:-}" ]]; then
  case "$TPU_TYPE" in
    v2-* | v3-* | v4-*) RUNTIME_VERSION=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) RUNTIME_VERSION=v2-alpha-tpuv5-lite ;;
    v5p-*) RUNTIME_VERSION=v2-alpha-tpuv5 ;;
    v6e-*) RUNTIME_VERSION=v2-alpha-tpuv6e ;;
    *) RUNTIME_VERSION="" ;;
  esac
fi

# Parse the options every TPU script shares: the other arguments before "--" are left in ARGS,
# those after it (for the trainer, verbatim) in PASS_ARGS.
ARGS=()
PASS_ARGS=()
tpu_parse_args() {
  while (($#)); do
    case "$1" in
      --dry-run) DRY_RUN=1 ;;
      -h | --help) vj_usage "$0"; exit 0 ;;
      --) shift; PASS_ARGS+=("$@"); break ;;
      *) ARGS+=("$1") ;;
    esac
    shift
  done
}

# For scripts that pass nothing on to the trainer.
tpu_no_pass_args() {
  ((${#PASS_ARGS[@]} == 0)) || die "unexpected arguments after --: ${PASS_ARGS[*]}"
}

tpu_require_base() {
  require_set PROJECT "export PROJECT=<your GCP project id>"
  require_set ZONE "export ZONE=<a zone with $TPU_TYPE, e.g. us-central2-b for v4>"
  [[ -n "$RUNTIME_VERSION" ]] ||
    die "RUNTIME_VERSION is not set and cannot be guessed from TPU_TYPE=$TPU_TYPE: export RUNTIME_VERSION=<TPU software version>"
  case "$CAPACITY" in
    spot | reserved | on-demand) ;;
    *) die "CAPACITY=$CAPACITY is not one of spot, reserved, on-demand" ;;
  esac
}

tpu_resolve_workdir() {
  if [[ -z "$WORKDIR" ]]; then
    require_set BUCKET "export BUCKET=<GCS bucket name> (or WORKDIR=gs://...)"
    WORKDIR="gs://${BUCKET#gs://}/var_jax/$RUN_NAME"
  fi
  if [[ "$WORKDIR" != gs://* && "${ALLOW_LOCAL_WORKDIR:-0}" != 1 ]]; then
    die "WORKDIR=$WORKDIR is not on GCS: every worker must see the same checkpoints (use gs://..., or ALLOW_LOCAL_WORKDIR=1 for a single-host slice)"
  fi
}

# The flags every gcloud TPU call takes.
tpu_loc=()
tpu_set_loc() { tpu_loc=("--project=$PROJECT" "--zone=$ZONE"); }

# tpu_ssh WORKER COMMAND: run COMMAND (one line of bash) on WORKER (a number or "all").
tpu_ssh() {
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${tpu_loc[@]}" "--worker=$1" "--command=$2"
}

# Sets QR_STATE to the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED, ...)
# or NOT_FOUND. In a dry run it prints the query and assumes DRY_RUN_STATE (default $1).
QR_STATE=""
tpu_qr_state() {
  local cmd=("$GCLOUD" compute tpus queued-resources describe "$QR_NAME" "${tpu_loc[@]}" "--format=value(state.state)")
  if vj_dry_run; then
    run "${cmd[@]}"
    QR_STATE="${DRY_RUN_STATE:-$1}"
    note "dry run: assuming the queued resource is $QR_STATE (set DRY_RUN_STATE to change)"
    return 0
  fi
  printf '+ %s\n' "$(vj_quote "${cmd[@]}")" >&2
  if ! QR_STATE="$("${cmd[@]}" 2>/dev/null)" || [[ -z "$QR_STATE" ]]; then
    QR_STATE=NOT_FOUND
  fi
  note "queued resource $QR_NAME: $QR_STATE"
}

# Wait until the queued resource is ACTIVE; die if it FAILED or vanished.
tpu_wait_active() {
  while :; do
    tpu_qr_state ACTIVE
    case "$QR_STATE" in
      ACTIVE) return 0 ;;
      FAILED | SUSPENDED | SUSPENDING | NOT_FOUND | DELETING)
        die "queued resource $QR_NAME is $QR_STATE, not becoming ACTIVE (see status.sh; resume.sh re-creates it)" ;;
    esac
    vj_dry_run && return 0
    sleep "$POLL_SECONDS"
  done
}

tpu_create_cmd() {
  local extra=() capacity=()
  read -r -a extra <<<"$CREATE_FLAGS"
  case "$CAPACITY" in
    spot) capacity=(--spot) ;;
    reserved) capacity=(--reserved) ;;
    on-demand) capacity=() ;;
  esac
  run "$GCLOUD" compute tpus queued-resources create "$QR_NAME" "${tpu_loc[@]}" \
    "--node-id=$TPU_NAME" "--accelerator-type=$TPU_TYPE" "--runtime-version=$RUNTIME_VERSION" \
    ${capacity[@]+"${capacity[@]}"} ${extra[@]+"${extra[@]}"}
}

tpu_delete_cmd() {
  # --force also deletes the TPU VMs of the queued resource; --quiet skips the prompt.
  run "$GCLOUD" compute tpus queued-resources delete "$QR_NAME" "${tpu_loc[@]}" --force "$@"
}

# One line of bash for the workers: is the trainer this launcher started still running?
tpu_running_probe() {
  local pidfile="\$HOME/$REMOTE_LOG_DIR/train.pid"
  printf '%s' "if [ -f $pidfile ] && kill -0 \"\$(cat $pidfile)\" 2>/dev/null; then echo \"VJ_RUNNING \$(hostname)\"; else echo \"VJ_STOPPED \$(hostname)\"; fi"
}

# Sets TRAINING to running | stopped | mixed (some workers running, some not) | unknown.
TRAINING=""
tpu_training_state() {
  local cmd=("$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${tpu_loc[@]}" --worker=all "--command=$(tpu_running_probe)")
  if vj_dry_run; then
    run "${cmd[@]}"
    TRAINING="${DRY_RUN_TRAINING:-stopped}"
    note "dry run: assuming the trainer is $TRAINING on the workers (set DRY_RUN_TRAINING to change)"
    return 0
  fi
  printf '+ %s\n' "$(vj_quote "${cmd[@]}")" >&2
  local out n_run n_stop
  if ! out="$("${cmd[@]}" 2>/dev/null)"; then
    TRAINING=unknown
    return 0
  fi
  n_run=$(grep -c VJ_RUNNING <<<"$out" || true)
  n_stop=$(grep -c VJ_STOPPED <<<"$out" || true)
  if ((n_run > 0 && n_stop == 0)); then
    TRAINING=running
  elif ((n_run == 0 && n_stop > 0)); then
    TRAINING=stopped
  elif ((n_run > 0)); then
    TRAINING=mixed
  else
    TRAINING=unknown
  fi
  note "trainer on $TPU_NAME: $TRAINING ($n_run running, $n_stop stopped)"
}
