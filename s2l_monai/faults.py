"""Fault injection for the crash tests: kill the process at a named point (``S2L_FAULT_AT=point:n``).

The resume guarantees (atomic checkpoints and store writes, exact resume) are only worth what a test with a real
``kill -9`` at the worst moments shows. A timer cannot aim at "between writing a checkpoint and renaming it", so
the code marks such moments with :func:`fault_point`; with ``S2L_FAULT_AT=checkpoint_write:2`` in the environment
the process sends itself ``SIGKILL`` the second time it passes ``checkpoint_write``. Without the variable a point
costs one dictionary lookup.

Points: ``step`` (after an optimiser step), ``ensemble_item`` (after an item's EMA update, mid-ensemble),
``checkpoint_write`` (checkpoint written to its temporary file, not yet renamed), ``volume_slice`` (a slice written
into the output volumes, :class:`s2l_monai.volumes.SaveVolumeSliced`). Under ``torchrun``,
``S2L_FAULT_RANK=r`` limits the fault to rank ``r`` (the others go on until they wait for it).
"""

from __future__ import annotations

import os
import signal

__all__ = ["FAULT_ENV", "FAULT_RANK_ENV", "fault_point"]

FAULT_ENV = "S2L_FAULT_AT"
FAULT_RANK_ENV = "S2L_FAULT_RANK"
_passes: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Count a pass through point ``name``; SIGKILL this process on the pass ``S2L_FAULT_AT`` names."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    only = os.environ.get(FAULT_RANK_ENV)
    if only not in (None, "") and int(only) != int(os.environ.get("RANK", 0)):
        return
    _passes[name] = _passes.get(name, 0) + 1
    if _passes[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
