#!/usr/bin/env bash
# Start the Scribble2Label MONAI Label server on 127.0.0.1, offline (no zoo listing, no SAM2 download).
# Usage: monailabel_app/start_server.sh STUDIES_DIR [PORT] [more `monailabel start_server` options, e.g. --conf bundle DIR]
# The environment comes from monailabel_app/setup_env.sh (.venv-monailabel; S2L_MONAILABEL_VENV overrides).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${S2L_MONAILABEL_VENV:-$here/../.venv-monailabel}"
studies="${1:?usage: $0 STUDIES_DIR [PORT] [options]}"
port="${2:-8000}"
shift $(( $# >= 2 ? 2 : 1 ))
# Same as the `monailabel start_server` command, with this environment's python (that script runs `python` from PATH).
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
# Training and inference share the CPU with the server and the data-loader workers: keep PyTorch's OpenMP threads
# from spinning (docs/design.md, "Speed on small machines"); an OMP_WAIT_POLICY already set wins.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
# MONAI Label's multi-GPU training runs `torchrun` from PATH: this environment's.
export PATH="$venv/bin:$PATH"
exec "$venv/bin/python" -m monailabel.main start_server --app "$here" --studies "$studies" --host 127.0.0.1 --port "$port" \
    --conf zoo_source github --conf sam2 false "$@"
