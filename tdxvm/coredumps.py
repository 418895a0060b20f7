"""Keep the controller's secrets out of core dumps.

The controller holds every key in its memory at one time or another: the release key,
each image's disk key, model keys, API keys, the secret store's contents. A crash would
write that memory to disk in the clear (a ``core`` file in the working folder,
systemd-coredump, apport), and any process of the same user could read it live through
``/proc/PID/mem`` or ptrace. Every tdxvm command turns both off for itself before it
does anything else (:func:`forbid_core_dumps`).
"""

from __future__ import annotations

import ctypes
import resource
import sys

PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def forbid_core_dumps() -> None:
    """No core file, for this process and the programs it starts (``RLIMIT_CORE`` 0), and
    on Linux not dumpable (``PR_SET_DUMPABLE`` 0): no core at all, through a
    ``core_pattern`` pipe either, whatever the limit (which another process of the user
    could raise again), and no ptrace or ``/proc/PID/mem`` for other processes of the same
    user. Programs it starts become dumpable again when they exec, but keep the limit."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
