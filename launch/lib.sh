# shellcheck shell=bash
# Helpers shared by every launch script (sourced, never run).
#
#   run CMD ARGS...   print "+ CMD ARGS..." (shell-quoted, one line), then run it;
#                     with DRY_RUN=1 (or --dry-run) only print it, on stdout.
#   die MESSAGE       one-line error on stderr, exit 2.
#   note MESSAGE      "# MESSAGE": on stdout in a dry run (part of the plan), else on stderr.
#
# Every command a script would run goes through `run`, so a dry run prints the
# complete plan, one command per line, each prefixed with "+ ".

VJ_SCRIPT_NAME="${VJ_SCRIPT_NAME:-$(basename "$0")}"
# shellcheck disable=SC2034  # used by the scripts that source this file
VJ_REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

vj_dry_run() {
  case "${DRY_RUN:-0}" in
    1 | true | yes | TRUE | YES) return 0 ;;
    *) return 1 ;;
  esac
}

die() {
  printf '%s: error: %s\n' "$VJ_SCRIPT_NAME" "$*" >&2
  exit 2
}

note() {
  if vj_dry_run; then
    printf '# %s\n' "$*"
  else
    printf '# %s\n' "$*" >&2
  fi
}

# Quote each argument for bash: safe words stay bare, anything else goes in single quotes.
vj_quote() {
  local safe='^[A-Za-z0-9_@%+=:,./-]+$' sq="'" out="" a q
  for a in "$@"; do
    if [[ "$a" =~ $safe ]]; then
      q="$a"
    else
      q="'${a//$sq/$sq\\$sq$sq}'"
    fi
    out+="${out:+ }$q"
  done
  printf '%s' "$out"
}

run() {
  if vj_dry_run; then
    printf '+ %s\n' "$(vj_quote "$@")"
    return 0
  fi
  printf '+ %s\n' "$(vj_quote "$@")" >&2
  "$@"
}

# require_set NAME HINT: die with one line if the variable NAME is empty.
require_set() {
  local name="$1" hint="$2"
  [[ -n "${!name:-}" ]] || die "$name is not set: $hint"
}

# Print the leading comment block of a script (its usage), without the "# " prefixes.
vj_usage() {
  sed -n '2,/^[^#]/{/^#/!q;s/^# \{0,1\}//;p;}' "$1"
}
