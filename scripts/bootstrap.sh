#!/usr/bin/env bash
# Creates .venv inside the repository (git-ignored) if missing and installs moekit into it.
# torch is pinned to the CPU build that a fresh machine has on disk: no multi-GB CUDA download.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${1:-}"
py="${PYTHON:-python3.11}"
command -v "$py" >/dev/null 2>&1 || py=python3
stamp=".venv/.moekit-installed${extras:+-$extras}"
if [ ! -x .venv/bin/python ]; then
    "$py" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}" "torch==2.13.0"
    touch "$stamp"
fi
