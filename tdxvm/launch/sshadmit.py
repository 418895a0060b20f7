"""A paramiko client transport that refuses the channels a host opens unless they are admitted.

paramiko's client opens every ``forwarded-tcpip`` channel the host sends once a remote
forward was asked for — on any port, as many as the host likes — and tells the host so
before the handler sees it; the handler can only close it again. :class:`Transport`
decides first: a channel the host opens is refused (``SSH_MSG_CHANNEL_OPEN_FAILURE``,
"administratively prohibited", RFC 4254 section 5.1) unless its ``admit`` says yes, so
a refused channel costs the controller nothing but the refusal. The policy (which ports,
how many at once) is the caller's: :class:`tdxvm.launch.sshhost.HostSession`.
"""

from __future__ import annotations

from collections.abc import Callable

import paramiko
from paramiko.common import OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED, cMSG_CHANNEL_OPEN_FAILURE

Admit = Callable[[str, int], bool]  # (channel kind, port on the host for forwarded-tcpip, else -1) -> open it?


def _refuse_all(_kind: str, _port: int) -> bool:
    return False


class Transport(paramiko.Transport):
    """paramiko's transport; channels the host opens pass ``admit`` first (none until it is set)."""

    admit: Admit = staticmethod(_refuse_all)

    def _parse_channel_open(self, m: paramiko.Message) -> None:  # runs in the transport's thread
        kind, chanid = m.get_text(), m.get_int()
        m.get_int(), m.get_int()  # the host's window and packet size
        port = -1
        if kind == "forwarded-tcpip":
            m.get_text()  # the address the host listened on
            port = m.get_int()
        if self.server_mode or self.admit(kind, port):
            m.rewind()
            super()._parse_channel_open(m)
            return
        refusal = paramiko.Message()
        refusal.add_byte(cMSG_CHANNEL_OPEN_FAILURE)
        refusal.add_int(chanid)
        refusal.add_int(OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED)
        refusal.add_string("refused by the controller")
        refusal.add_string("en")
        self._send_message(refusal)
