#!/usr/bin/env bash
# One-shot check of one GPU, within 8 minutes on an H100: bf16 matmul peak, VAR-d16 and d20 bf16
# train-step img/s with achieved TFLOP/s and MFU, d16 sampling img/s at batch 1/16/64, the compiled
# per-device memory of the VAR-d30 train step, and the official PyTorch code side by side when
# OFFICIAL is set. Prints one table on stdout; JSON in $OUT (docs/gpu.md explains each row).
#
# Usage: launch/gpu/device_check.sh [--dry-run] [--smoke] [--] [more args of python -m var_jax.bench device]
#   --smoke       the same code path on the CPU with tiny models (no GPU needed)
#   --dry-run     print the command instead of running it (also DRY_RUN=1)
# Settings (environment):
#   OUT           folder for device_check.json and parts/*.json (default ./workdir/device_check in the
#                 repository, which git ignores)
#   OFFICIAL      a checkout of FoundationVision/VAR to compare with (needs torch with CUDA); unset: skipped
#   BUDGET        seconds for all parts together (default 450: the whole check ends within 8 minutes)
#   PYTHON        default: the repository's .venv/bin/python if present, else python3
#   CUDA_VISIBLE_DEVICES  the first visible GPU is the one measured
set -euo pipefail
# shellcheck source=../lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

bench_args=()
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    -h | --help) vj_usage "$0"; exit 0 ;;
    --) shift; bench_args+=("$@"); break ;;
    *) bench_args+=("$1") ;;
  esac
  shift
done

OUT="${OUT:-$VJ_REPO_ROOT/workdir/device_check}"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$VJ_REPO_ROOT/.venv/bin/python" ]]; then PYTHON="$VJ_REPO_ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
cmd=("$PYTHON" -m var_jax.bench device --out "$OUT")
if [[ -n "${OFFICIAL:-}" ]]; then
  [[ -d "$OFFICIAL/models" ]] || die "OFFICIAL=$OFFICIAL is not a checkout of FoundationVision/VAR (no models/)"
  cmd+=(--official "$OFFICIAL")
fi
if [[ -n "${BUDGET:-}" ]]; then
  cmd+=(--budget "$BUDGET")
fi

cd "$VJ_REPO_ROOT"
note "device check -> $OUT"
run "${cmd[@]}" ${bench_args[@]+"${bench_args[@]}"}
