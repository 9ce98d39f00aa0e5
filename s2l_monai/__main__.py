"""``python -m s2l_monai ...`` runs the ``s2l`` command line (:func:`s2l_monai.cli.main`)."""

from __future__ import annotations

import sys

from s2l_monai.cli import main

if __name__ == "__main__":
    sys.exit(main())
