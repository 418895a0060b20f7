"""The one base of tdxvm's errors, and the exit statuses they map to.

Every package's errors derive from :class:`TdxvmError` (this module also ships into the
guest image, so the guest's errors share it). An error carries a stable ``code`` (a
short machine-readable name, shown in ``-o json`` output) and ``exit_status``, which
the CLI returns, decided by ``isinstance`` and never guessed from attributes:

==  =====================================================================
0   ok / accepted
1   refused: a verification, policy or pin said no (:class:`Refused`)
2   unusable input: a file, field, option or state the user can fix (:class:`TdxvmError`)
3   unreachable: libvirt, SSH, PCS, a guest that does not answer (:class:`Unreachable`)
4   internal error: a bug (any exception that is not a :class:`TdxvmError`)
5   partial: a fleet command handled some hosts or VMs but not all
130 interrupted (Ctrl-C); 143 terminated (SIGTERM); 141 stdout closed early (a broken pipe)
==  =====================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_INPUT = 2
EXIT_UNREACHABLE = 3
EXIT_INTERNAL = 4
EXIT_PARTIAL = 5
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it


class TdxvmError(Exception):
    """Base of every error tdxvm raises on purpose. ``str(err)`` is the message for
    people; ``code`` the stable name for scripts; ``exit_status`` what the CLI returns.
    A subclass sets ``code`` as a class attribute; one raise may override it."""

    code = "error"
    exit_status = EXIT_INPUT

    def __init__(self, message: str = "", *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class Refused(TdxvmError):
    """A verification, a policy or a pin said no: the answer, not a failure to get one."""

    code = "refused"
    exit_status = EXIT_REFUSED


class Unreachable(TdxvmError):
    """Something on the network or the host did not answer: libvirtd, SSH, PCS, a guest
    that timed out. Trying again later may work; nothing was decided."""

    code = "unreachable"
    exit_status = EXIT_UNREACHABLE
