#!/usr/bin/env bash
# Put the code and a Python environment on every worker of the TPU slice (idempotent).
#
# Usage: launch/tpu/setup.sh [--dry-run] [--code-only]
#   --code-only  only ship the code (after a local edit); skip the Python install
#   --dry-run    print the commands instead of running them (also DRY_RUN=1)
# Code: CODE_SOURCE=local (default) packs this checkout (tracked and untracked, not
# git-ignored files, so uncommitted edits travel) and copies it to all workers;
# CODE_SOURCE=git clones REPO_URL at BRANCH on every worker instead.
# Python: python$PYTHON_VERSION (deadsnakes PPA if the image lacks it), a venv at
# ~/$REMOTE_VENV, the pinned requirements.txt + requirements-gcs.txt (gs:// support) and
# $JAX_TPU_SPEC from $LIBTPU_FIND_LINKS (plus $EXTRA_PIP, if set).
# Settings: see launch/tpu/common.sh (PROJECT, ZONE, TPU_NAME, ... are required as there).
set -euo pipefail
# shellcheck source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

tpu_parse_args "$@"
tpu_no_pass_args
code_only=0
for a in ${ARGS[@]+"${ARGS[@]}"}; do
  case "$a" in
    --code-only) code_only=1 ;;
    *) die "unknown argument: $a (see --help)" ;;
  esac
done
tpu_require_base
tpu_set_loc
for v in REMOTE_DIR REMOTE_VENV REMOTE_LOG_DIR; do
  [[ "${!v}" =~ ^[A-Za-z0-9_.][A-Za-z0-9_./-]*$ ]] || die "$v=${!v} must be a plain relative path"
done

code="\$HOME/$REMOTE_DIR"
venv="\$HOME/$REMOTE_VENV"

# --- code -----------------------------------------------------------------------------
case "$CODE_SOURCE" in
  local)
    git -C "$VJ_REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
      die "$VJ_REPO_ROOT is not a git checkout: use CODE_SOURCE=git REPO_URL=..."
    tarball="${TMPDIR:-/tmp}/var_jax-code-$TPU_NAME.tar.gz"
    filelist="${TMPDIR:-/tmp}/var_jax-code-$TPU_NAME.files"
    note "packing $VJ_REPO_ROOT (tracked + untracked, not ignored) into $tarball"
    if vj_dry_run; then
      printf '+ %s > %s\n' "$(vj_quote git -C "$VJ_REPO_ROOT" ls-files -z --cached --others --exclude-standard)" \
        "$(vj_quote "$filelist")"
    else
      # Files deleted in the work tree are still "cached": keep only those that exist.
      : >"$filelist"
      while IFS= read -r -d '' f; do
        if [[ -e "$VJ_REPO_ROOT/$f" ]]; then printf '%s\0' "$f" >>"$filelist"; fi
      done < <(git -C "$VJ_REPO_ROOT" ls-files -z --cached --others --exclude-standard)
    fi
    export COPYFILE_DISABLE=1 # macOS tar: no ._ resource-fork files
    run tar -czf "$tarball" -C "$VJ_REPO_ROOT" --null -T "$filelist"
    run "$GCLOUD" compute tpus tpu-vm scp "$tarball" "$TPU_NAME:var_jax-code.tar.gz" "${tpu_loc[@]}" --worker=all
    tpu_ssh all "rm -rf $code && mkdir -p $code && tar -xzf \$HOME/var_jax-code.tar.gz -C $code && rm -f \$HOME/var_jax-code.tar.gz"
    run rm -f "$tarball" "$filelist"
    ;;
  git)
    require_set REPO_URL "export REPO_URL=<git URL the workers can clone> (or CODE_SOURCE=local)"
    tpu_ssh all "rm -rf $code && git clone --depth=1 --branch=$(vj_quote "$BRANCH") $(vj_quote "$REPO_URL") $code"
    ;;
  *) die "CODE_SOURCE=$CODE_SOURCE is not one of local, git" ;;
esac

# --- python ---------------------------------------------------------------------------
if ((!code_only)); then
  py="python$PYTHON_VERSION"
  apt="sudo apt-get -o DPkg::Lock::Timeout=600"
  extra_pip="${EXTRA_PIP:+ $EXTRA_PIP}"
  tpu_ssh all "set -e; if ! command -v $py >/dev/null; then $apt update -y && $apt install -y software-properties-common && sudo add-apt-repository -y ppa:deadsnakes/ppa && $apt install -y $py $py-venv; fi; [ -x $venv/bin/python ] || $py -m venv $venv; $venv/bin/pip install -q -U pip; $venv/bin/pip install -q -r $code/requirements.txt -r $code/requirements-gcs.txt \"$JAX_TPU_SPEC\"$extra_pip -f $LIBTPU_FIND_LINKS; $venv/bin/python -c \"import jax, jaxlib; print(jax.__version__, jaxlib.__version__)\"; $venv/bin/pip list 2>/dev/null | grep -i -E \"^(jax|jaxlib|libtpu) \""
fi
note "next: launch/tpu/train.sh"
