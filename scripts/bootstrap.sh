#!/usr/bin/env bash
# Creates .venv inside the repository (git-ignored) if missing and installs moekit into it.
# torch is pinned to 2.13.0. Our machines' pip finds the CPU build on disk; elsewhere PyPI's
# Linux wheel is the multi-GB CUDA build, so MOEKIT_TORCH_INDEX can name an index to take
# torch from (https://download.pytorch.org/whl/cpu for the CPU build).
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
    .venv/bin/python -m pip install -q ${MOEKIT_TORCH_INDEX:+--index-url "$MOEKIT_TORCH_INDEX"} \
        "torch==2.13.0"
    .venv/bin/python -m pip install -q -e ".${extras:+[$extras]}" "torch==2.13.0"
    touch "$stamp"
fi
