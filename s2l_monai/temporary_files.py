"""Names of the hidden temporary files behind atomic writes, and the clean-up of those a killed process left.

Every store in this package (EMA averages, uncertainty maps) writes a hidden ``.<name>.<pid>-<host>.tmp*`` file
and renames it into place. Under ``torchrun`` a store folder may be shared by the ranks of several machines, where a
process id alone does not say whose a file is, hence the host in the name.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

__all__ = ["pid_alive", "remove_stale_temporaries", "temporary_tag"]

_HOST = re.sub(r"[^A-Za-z0-9_]+", "_", socket.gethostname()) or "host"
_TAG = re.compile(r"\.(\d+)(?:-([A-Za-z0-9_]+))?\.tmp")


def temporary_tag() -> str:
    """``<pid>-<host>`` of this process, for a temporary file's name."""
    return f"{os.getpid()}-{_HOST}"


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine with id ``pid`` is running."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> None:
    """Delete the hidden temporary files in ``folder`` of this machine's processes that no longer run."""
    for tmp in Path(folder).glob(".*.tmp*"):
        found = _TAG.findall(tmp.name)
        if not found:
            continue
        pid, host = int(found[-1][0]), found[-1][1]
        if host and host != _HOST:
            continue  # another machine's process: it may still be writing
        if pid != os.getpid() and not pid_alive(pid):
            tmp.unlink(missing_ok=True)
