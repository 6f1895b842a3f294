"""The ZAP handler: the kernel (ipc) or a CURVE key (tcp) says who each connection is.

libzmq asks the ZAP handler (RFC 27, a socket bound at ``inproc://zeromq.zap.01``
in the daemon's context) about every new connection of a socket that has a
``ZAP_DOMAIN``; with ``ZAP_ENFORCE_DOMAIN`` set it also refuses connections
while no handler is bound, so nothing gets in unauthenticated.  The request's
frames are ``version, request_id, domain, address, routing_id, mechanism,
credentials...``:

* **ipc (NULL mechanism)** -- ``address`` is ``localhost:<uid>:<gid>:<pid>``:
  libzmq reads ``SO_PEERCRED`` of the accepted Unix socket and appends the
  connecting process's credentials (measured with libzmq 4.3.5;
  tests/npud/test_npud_auth.py checks it).
* **tcp (CURVE mechanism)** -- one credential, the client's 32-byte public key,
  which the policy maps to a named identity with a uid; unknown keys are refused
  (status 400) before the client can send a single message.

The reply's user id is ``Identity.user_id()``; libzmq attaches it as the
``User-Id`` property of every message the connection sends, so the dispatcher
authorises each request on it (npud/server.py).  One trio task owns the
handler's socket (npud.ipc_schema.trio_zmq).
"""

from __future__ import annotations

import logging
import os

import zmq
import zmq.auth
from zmq.utils import z85

from npud.ipc_schema.trio_zmq import OwnedSocket

from .config import ConfigError
from .policy import Identity, Policy, ipc_identity

log = logging.getLogger("npud.auth")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"
ZAP_DOMAIN = b"npud"


class ZapHandler:
    """Bind the ZAP endpoint at once (so no connection is ever asked about without it),
    then answer requests in ``run`` (the socket's owner task)."""

    def __init__(self, ctx: zmq.Context, policy: Policy):
        self.policy = policy
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(ZAP_ENDPOINT)
        self.owned = OwnedSocket(self.sock, self._on_frames)
        self.accepted = 0
        self.refused = 0

    async def run(self) -> None:
        await self.owned.run()

    def close(self) -> None:
        self.sock.close(linger=0)

    def _on_frames(self, frames: list[bytes]) -> None:
        # [routing id, b"", version, request id, domain, address, identity, mechanism, *credentials]
        if len(frames) < 8 or frames[1] != b"":
            log.warning("malformed ZAP request (%d frames) ignored", len(frames))
            return
        rid, _, version, request_id, domain, address, _routing, mechanism, *creds = frames
        try:
            identity, refusal = self.decide(version, domain, address, mechanism, creds)
        except Exception:  # never let a bug take the daemon down, and never let it in
            log.exception("ZAP handler failed; refusing the connection")
            identity, refusal = None, "internal error in the ZAP handler"
        if identity is None:
            self.refused += 1
            log.warning("refused a %s connection from %s: %s", mechanism.decode("ascii", "replace"),
                        address.decode("utf-8", "replace"), refusal)
            reply = [rid, b"", b"1.0", request_id, b"400", refusal.encode()[:255], b"", b""]
        else:
            self.accepted += 1
            reply = [rid, b"", b"1.0", request_id, b"200", b"OK", identity.user_id().encode(), b""]
        self.owned.send(reply)

    def decide(self, version: bytes, domain: bytes, address: bytes, mechanism: bytes,
               creds: list[bytes]) -> tuple[Identity | None, str]:
        """The identity of a connection, or None and why it is refused."""
        if version != b"1.0":
            return None, f"unsupported ZAP version {version!r}"
        if domain != ZAP_DOMAIN:
            return None, f"unknown ZAP domain {domain!r}"
        if mechanism == b"NULL":
            identity = ipc_identity(address.decode("utf-8", "replace"))
            if identity is None:
                # tcp is never NULL (it is CURVE-only); an ipc address without credentials
                # means libzmq was built without SO_PEERCRED: fail closed.
                return None, "no peer credentials in the ZAP address (not an ipc peer, or no SO_PEERCRED)"
            return identity, ""
        if mechanism == b"CURVE":
            if len(creds) != 1 or len(creds[0]) != 32:
                return None, "malformed CURVE credentials"
            key = z85.encode(creds[0])
            client = self.policy.curve_client(key)
            if client is None:
                return None, f"unknown CURVE key {key.decode()}"
            return Identity("curve", client.uid, -1, 0, client.name), ""
        return None, f"mechanism {mechanism.decode('ascii', 'replace')} is not allowed"


def identity_of(frame: zmq.Frame) -> Identity | None:
    """The identity the ZAP handler gave the connection a message came on."""
    try:
        user_id = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return Identity.parse(user_id) if user_id else None


def load_server_secret(path: str, key: str = "curve.secret_key_file") -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys from a zmq.auth secret certificate; ConfigError naming ``key``."""
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{key}: cannot read a zmq.auth certificate from {path}: {exc}") from None
    if not secret:
        raise ConfigError(f"{key}: {path} has no secret-key (give the .key_secret file, "
                          "not the public .key)")
    if len(secret) != 40 or not public or len(public) != 40:
        raise ConfigError(f"{key}: {path} does not hold 40-character Z85 keys")
    return public, secret


def generate_keys(directory: str, name: str = "server") -> tuple[str, str]:
    """A CURVE key pair as zmq.auth certificates: ``NAME.key`` (public) and ``NAME.key_secret`` (0600)."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    old = os.umask(0o077)
    try:
        public_file, secret_file = zmq.auth.create_certificates(directory, name)
    finally:
        os.umask(old)
    os.chmod(public_file, 0o644)
    os.chmod(secret_file, 0o600)
    return public_file, secret_file
