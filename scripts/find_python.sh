#!/usr/bin/env sh
# Prints the newest usable Python (>= 3.11) for the project's virtual environment.
# Prefers python3.12 (it gets jax 0.12; on jax 0.10 sharded CPU steps were seen to hang),
# then any other 3.11+ interpreter. A pyenv shim that exists but cannot run is skipped.
for cand in python3.12 python3.13 \
    $(ls -d "${PYENV_ROOT:-$HOME/.pyenv}"/versions/3.12*/bin/python3.12 2>/dev/null) \
    python3.11 python3; do
  if "$cand" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; then
    echo "$cand"
    exit 0
  fi
done
echo "find_python.sh: no Python >= 3.11 found (install python3.12)" >&2
exit 1
