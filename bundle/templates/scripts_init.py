"""Custom code of the scribble2label bundle (copied here by ``bundle/build.py``; do not edit in the bundle).

``scripts/s2l_monai/`` is a verbatim copy of the ``s2l_monai`` package of the s2l-monai repository, made when the
package was built. Its modules import each other as ``s2l_monai.x``, so the folder holding it must be on
``sys.path``. The bundle's configs list ``"$import scripts"`` before ``"$import s2l_monai"`` in ``imports``:
MONAI evaluates all import statements of a config, in order, before it resolves anything else, so importing this
package first puts ``<bundle>/scripts`` on ``sys.path`` in time for the ``$import s2l_monai`` statements and for
every ``"_target_": "s2l_monai...."``.

It only does so when ``s2l_monai`` is not importable already (an installed s2l-monai wins). ``scripts`` itself is
found because ``python -m monai.bundle`` puts the working directory on ``sys.path``: run the bundle's commands from
the bundle folder, as with any zoo bundle, or put ``<bundle>/scripts`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib.util
import os
import sys

SCRIPTS_DIR = os.path.dirname(os.path.abspath(__file__))

if importlib.util.find_spec("s2l_monai") is None and SCRIPTS_DIR not in sys.path:
    sys.path.insert(0, SCRIPTS_DIR)
