"""Admission to the coordinator's ROUTER: who may connect, and where it listens.

The driver mints, per rank, a secret ZMQ identity and (over TCP) a CurveZMQ client key pair, and
hands them to the rank through Ray. Over TCP the ZAP handler admits only this job's client keys, and
CURVE encrypts the traffic. Same-host ranks use a unix socket in a 0700 directory (CURVE's
encryption would cost more than the reduction itself there). Either way the coordinator accepts
traffic only from the minted identities, so no other process can join or inject partials.
"""

from __future__ import annotations

import logging
import os
import secrets
import tempfile
from dataclasses import dataclass

import zmq
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)


@dataclass
class CurveKeys:
    server_public: bytes
    server_secret: bytes
    clients: list[tuple[bytes, bytes]]  # (public, secret) per rank

    @classmethod
    def mint(cls, tp: int) -> "CurveKeys":
        return cls(*zmq.curve_keypair(), clients=[zmq.curve_keypair() for _ in range(tp)])


class _AllowJobKeys:
    def __init__(self, allowed: set[bytes]):
        self.allowed = allowed

    def callback(self, domain, key) -> bool:
        ok = key in self.allowed  # pyzmq hands over the z85 form, as curve_keypair() mints it
        if not ok:
            log.warning("refused a CURVE client whose key is not one of this job's ranks")
        return ok


def rank_identities(tp: int) -> list[bytes]:
    """A secret ZMQ identity per rank; the coordinator drops traffic from any other."""
    return [b"rank%d-" % r + secrets.token_hex(16).encode() for r in range(tp)]


def curve_server(ctx: zmq.Context, sock: zmq.Socket, keys: CurveKeys) -> ThreadAuthenticator:
    """Make `sock` a CURVE server whose ZAP handler (returned, running) admits only `keys`'
    clients."""
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve_callback(
        domain="*", credentials_provider=_AllowJobKeys({pub for pub, _ in keys.clients}))
    sock.curve_server = True
    sock.curve_secretkey = keys.server_secret
    sock.curve_publickey = keys.server_public
    return auth


def bind(sock: zmq.Socket, transport: str, bind_host: str) -> tuple[str, str | None]:
    """Bind `sock` -> (its address, the private directory of its unix socket, else None)."""
    if transport == "ipc":  # every rank on this host: unix sockets skip the TCP stack
        ipc_dir = tempfile.mkdtemp(prefix="tpserve-")  # mode 0700: this user only
        address = f"ipc://{ipc_dir}/coordinator.sock"
        sock.bind(address)
        return address, ipc_dir
    host = os.environ.get("TPSERVE_COORDINATOR_HOST", bind_host)
    port = sock.bind_to_random_port(f"tcp://{host}")
    return f"tcp://{host}:{port}", None
