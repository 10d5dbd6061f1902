# Shared helpers for the launch scripts (sourced, not run).
# shellcheck shell=bash

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY_RUN="${DRY_RUN:-0}"

die() {
  echo "error: $*" >&2
  exit 2
}

# Prints one argument, single-quoted only when the shell needs it, so that
# dry-run output can be pasted back into a shell.
_quote() {
  local a="$1"
  if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then
    printf '%s' "$a"
  else
    printf "'%s'" "${a//\'/\'\\\'\'}"
  fi
}

# run CMD ARGS...: runs the command, or prints it ("+ cmd args") in dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'
    local a
    for a in "$@"; do
      printf ' '
      _quote "$a"
    done
    printf '\n'
  else
    "$@"
  fi
}

# config_names CONFIG: sets DATASET ("voc" for configs/voc.py:paper) and
# DEFAULT_RUN ("voc-paper"; preset "paper" when none is given, commas
# become dashes), the default run name / workdir of the launch scripts.
config_names() {
  local file="${1%%:*}" preset="${1#*:}"
  [[ "$preset" == "$1" ]] && preset=paper
  DATASET="$(basename "$file" .py)"
  DEFAULT_RUN="${DATASET}-${preset//,/-}"
}

# The pinned JAX version (requirements.txt), for the accelerator extras.
jax_version() {
  local v
  v="$(sed -n 's/^jax==\([^[:space:]]*\).*/\1/p' "$REPO_ROOT/requirements.txt")"
  [[ -n "$v" ]] || die "no 'jax==' pin in $REPO_ROOT/requirements.txt"
  printf '%s' "$v"
}
