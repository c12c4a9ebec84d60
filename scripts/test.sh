#!/usr/bin/env bash
# The whole test suite (lint, format check, tests), in the repository's own virtual environment.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh" dev
cd "$root"
.venv/bin/ruff check moekit tests benchmarks scripts
.venv/bin/ruff format --check moekit tests benchmarks scripts
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
