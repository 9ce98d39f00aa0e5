#!/usr/bin/env bash
# The MONAI Label integration test: build the app's environment if it is missing, then start a real server and
# test scribble upload, training and inference against it (tests/monailabel/test_server.py, about 5-10 min on
# 2 CPU cores). Needs the main environment (.venv) and ../shared/data/bbbc038/stage1_train.zip (else it skips).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv-monailabel/bin/python ] || bash monailabel_app/setup_env.sh
S2L_MONAILABEL_TEST=1 .venv/bin/pytest -q -s -p no:cacheprovider tests/monailabel "$@"
