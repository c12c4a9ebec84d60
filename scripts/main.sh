#!/usr/bin/env bash
# The main job: train the tiny MoE preset on the embedded corpus, sample from it, show the plots.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh" plots
cd "$root"
exec .venv/bin/python -m moekit demo "$@"
