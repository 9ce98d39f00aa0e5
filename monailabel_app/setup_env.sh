#!/usr/bin/env bash
# Build the MONAI Label environment of the Scribble2Label app: .venv-monailabel (or $S2L_MONAILABEL_VENV).
#
# MONAI Label 0.8.5 cannot share the main .venv (its dependencies pull torchvision, a CUDA torch and numpy 1.26).
# This environment keeps the CPU torch 2.13.0 and leaves out what the app never imports: torchvision (only
# monailabel.transform.post, MONAI Label's BundleInferTask and scribble/DeepEdit code use it) and sam2 (disabled).
# Everything else is pinned exactly in monailabel_app/requirements.txt; numpy is 1.26.4 and pydicom 2.4.4,
# pynetdicom 2.1.1, dicomweb-client 0.59.3 as MONAI Label 0.8.5 needs. Offline-capable: it only uses the
# configured package index / wheel folders. Ends with an import check.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${S2L_MONAILABEL_VENV:-.venv-monailabel}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
start=$(date +%s)
python3 -m venv "$venv"
"$venv/bin/pip" install -q torch==2.13.0
"$venv/bin/pip" install -q -r monailabel_app/requirements.txt
# Last and without dependencies: installed first, its metadata (sam2, torchvision, dicomweb-client[gcp]) makes pip's
# resolver refuse the pinned set.
"$venv/bin/pip" install -q --no-deps monailabel==0.8.5
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/python" - <<'PY'
import numpy, torch, monai, monailabel
import monailabel.main, monailabel.tasks.infer.basic_infer, monailabel.tasks.train.bundle  # noqa: F401
import s2l_monai.ensemble  # noqa: F401
assert numpy.__version__.startswith("1.26"), numpy.__version__
print(f"MONAI Label {monailabel.__version__}, MONAI {monai.__version__}, torch {torch.__version__}, numpy {numpy.__version__}")
PY
echo "MONAI Label environment ready in $venv ($(( $(date +%s) - start )) s)"
