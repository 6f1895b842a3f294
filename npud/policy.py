"""Who may do what: identities, the policy file, and every decision made on them.

An *identity* is what the kernel (or a CURVE key) says a peer is, never what
the peer claims.  Over ipc, libzmq reads the connecting process's credentials
(``SO_PEERCRED``: uid, gid, pid) and hands them to npud's ZAP handler
(npud/auth.py) in the request's address field; over tcp, the client's CURVE
public key is looked up in this policy and mapped to a named identity with a
uid.  The ZAP handler returns the identity as the connection's ZeroMQ
``User-Id``, which libzmq attaches to every message of that connection, so
every request is authorised on it (npud/server.py).

The policy file (TOML; ``policy = "/etc/npud/policy.toml"`` in the config)::

    [connect]                     # who may open a session (absent: whoever can open the socket)
    users = ["alice", 1001]       # user names or uids
    groups = ["npu"]              # group names or gids: their members (primary or supplementary)

    [admin]                       # who may run every admin op (root and the daemon's own uid always may)
    users = ["alice"]
    groups = ["wheel"]
    [admin.cache_clear]           # extra grantees of one op: kill_client, reset_device, cache_clear
    users = ["bob"]

    [quotas.default]              # every uid without a table of its own
    memory = "4GiB"               # bytes of buffer objects, all of the uid's sessions together
    jobs_in_flight = 64           # queued or running jobs, all of the uid's sessions together
    sessions = 64                 # open sessions (default: a quarter of [limits] max_sessions)
    priority_ceiling = "high"     # highest scheduling priority its contexts may ask for
    share = 1                     # its weight in the devices' fair share

    [quotas.users.alice]          # a user name or a uid ("1001"); unset keys come from default
    memory = "16GiB"

    [[curve_clients]]             # tcp clients: a CURVE public key and who it is
    name = "ci-runner"
    public_key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"    # Z85, 40 characters, or
    # public_key_file = "/etc/npud/curve/ci-runner.key"      # a zmq.auth certificate
    user = "alice"                # the uid whose rights and quotas apply

Everything is checked when the file is loaded; a mistake is a ``ConfigError``
naming the key, and npud refuses to start.  Without a policy file, anyone who
can open the socket may connect, admin ops are for root and the daemon's own
uid, and only the config's per-session ``[limits]`` apply, with the default
per-uid session quota.

Sessions: one user may hold at most its ``sessions`` quota (root and the
daemon's own uid are exempt unless ``[quotas.users]`` has a table for them), and
the last ``[limits] admin_sessions`` of ``max_sessions`` are kept for admins,
so that no user can fill the daemon and lock out the admin who would end it.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from npud.ipc_schema.errors import ErrorCode, RequestError

from .config import ConfigError, load_toml, parse_size
from .scheduler import PRIORITIES

if TYPE_CHECKING:
    from .sessions import Session

ADMIN_OPS = ("kill_client", "reset_device", "cache_clear")
DEFAULT_CEILING = "high"           # realtime only where the policy grants it
MAX_ID = 2**32 - 2                 # (uid_t)-1 is "no user"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_Z85 = re.compile(r"^[0-9a-zA-Z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


# --- identities ----------------------------------------------------------------------


@dataclass(frozen=True)
class Identity:
    """Who a connection is: ``kind`` "ipc" (the kernel's word) or "curve" (a key in the policy)."""

    kind: str
    uid: int
    gid: int = -1
    pid: int = 0
    name: str = ""      # curve: the key's name in the policy

    def user_id(self) -> str:
        """The ZAP User-Id carrying this identity: ``kind:uid:gid:pid:name``."""
        return f"{self.kind}:{self.uid}:{self.gid}:{self.pid}:{self.name}"

    @classmethod
    def parse(cls, user_id: str) -> "Identity | None":
        """The identity in a User-Id written by ``user_id()``, or None."""
        parts = user_id.split(":", 4)
        if len(parts) != 5 or parts[0] not in ("ipc", "curve"):
            return None
        try:
            return cls(parts[0], int(parts[1]), int(parts[2]), int(parts[3]), parts[4])
        except ValueError:
            return None

    def describe(self) -> str:
        if self.kind == "curve":
            return f"CURVE key {self.name!r} (as uid {self.uid})"
        return f"uid {self.uid} (gid {self.gid}, pid {self.pid})"


def ipc_identity(address: str) -> Identity | None:
    """The peer of an ipc connection from the address libzmq passes to ZAP.

    libzmq (built with SO_PEERCRED, as on Linux) appends ``:uid:gid:pid`` of the
    connecting process to an ipc peer's address, e.g. ``localhost:1000:1000:4242``.
    """
    parts = address.rsplit(":", 3)
    if len(parts) != 4:
        return None
    try:
        uid, gid, pid = (int(p) for p in parts[1:])
    except ValueError:
        return None
    if not (0 <= uid <= MAX_ID and 0 <= gid <= MAX_ID and pid >= 0):
        return None
    return Identity("ipc", uid, gid, pid)


# --- the policy ----------------------------------------------------------------------


@dataclass(frozen=True)
class Grant:
    """A set of users and groups."""

    uids: frozenset[int] = frozenset()
    gids: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.uids or self.gids)

    def covers(self, uid: int, gid: int = -1) -> bool:
        return uid in self.uids or bool(self.gids and self.gids & groups_of(uid, gid))


def groups_of(uid: int, gid: int = -1) -> frozenset[int]:
    """The gids ``uid`` is a member of: the peer's gid, its primary group, its supplementary groups."""
    gids = {gid} if gid >= 0 else set()
    try:
        entry = pwd.getpwuid(uid)
        gids.add(entry.pw_gid)
        gids.update(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except (KeyError, OSError):
        pass
    return frozenset(gids)


@dataclass(frozen=True)
class Quota:
    memory: int | None = None          # bytes over all the uid's sessions (None: only [limits])
    jobs_in_flight: int | None = None  # over all the uid's sessions (None: only [limits])
    sessions: int | None = None        # open sessions (None: a quarter of [limits] max_sessions)
    priority_ceiling: str = DEFAULT_CEILING
    share: int = 1


@dataclass(frozen=True)
class CurveClient:
    name: str
    public_key: bytes     # Z85
    uid: int


@dataclass(frozen=True)
class Policy:
    connect: Grant | None = None                    # None: anyone who can open the socket
    admin: Grant = Grant()
    admin_ops: dict[str, Grant] = field(default_factory=dict)
    default_quota: Quota = Quota()
    quotas: dict[int, Quota] = field(default_factory=dict)
    curve_clients: dict[bytes, CurveClient] = field(default_factory=dict)
    daemon_uid: int = field(default_factory=os.getuid)
    source: str = ""

    # --- decisions ---

    def connect_refusal(self, identity: Identity | None) -> str | None:
        """Why ``identity`` may not use the daemon, or None if it may."""
        if identity is None:
            return ("this connection has no identity: npud could not learn the peer's uid from the kernel "
                    "(ipc) or its CURVE key (tcp)")
        if self.connect is None or identity.uid in (0, self.daemon_uid):
            return None
        if self.connect.covers(identity.uid, identity.gid):
            return None
        return (f"{identity.describe()} may not use npud: not in the policy's [connect] users or groups "
                f"({self.source or 'policy'})")

    def allows_connect(self, identity: Identity | None) -> bool:
        return self.connect_refusal(identity) is None

    def admin_refusal(self, uid: int, gid: int, op: str) -> str | None:
        if uid < 0:
            return (f"{op} is an admin operation and this session's user is unknown: the daemon learns it "
                    "from the kernel")
        if uid in (0, self.daemon_uid) or self.admin.covers(uid, gid):
            return None
        grant = self.admin_ops.get(op)
        if grant is not None and grant.covers(uid, gid):
            return None
        if self.admin or self.admin_ops:
            return (f"{op} is an admin operation; uid {uid} is not granted it in the policy's [admin] "
                    f"or [admin.{op}] ({self.source or 'policy'})")
        return (f"{op} is an admin operation, allowed to root and to the daemon's user (uid {self.daemon_uid}); "
                f"this session's user is uid {uid}")

    def may_admin(self, identity: Identity, op: str) -> bool:
        return self.admin_refusal(identity.uid, identity.gid, op) is None

    def quota_for(self, uid: int) -> Quota:
        return self.quotas.get(uid, self.default_quota)

    def session_quota(self, uid: int, max_sessions: int) -> int | None:
        """How many sessions ``uid`` may hold at once (None: no per-uid cap).  Root and the daemon's
        own user have none unless the policy gives them a table of their own."""
        if uid < 0 or (uid in (0, self.daemon_uid) and uid not in self.quotas):
            return None
        quota = self.quota_for(uid).sessions
        return quota if quota is not None else max(1, max_sessions // 4)

    def priority_ceiling(self, uid: int) -> int:
        """The highest priority class (an index into PRIORITIES) ``uid``'s contexts may use."""
        return PRIORITIES.index(self.quota_for(uid).priority_ceiling)

    def share(self, uid: int) -> int:
        """``uid``'s weight in fair share between contexts of one priority class."""
        return self.quota_for(uid).share

    def curve_client(self, public_key: bytes) -> CurveClient | None:
        return self.curve_clients.get(public_key)


DEFAULT = Policy()
_active = DEFAULT


def set_active(policy: Policy) -> None:
    """The daemon's policy, used by the checks below when none is passed."""
    global _active
    _active = policy


def active() -> Policy:
    return _active


# --- the checks the handlers call ----------------------------------------------------------


def admin_refusal(session: "Session", op: str, daemon_uid: int | None = None,
                  policy: Policy | None = None) -> str | None:
    """Why ``session`` may not perform admin op ``op``, or None if it may."""
    policy = policy or _active
    if daemon_uid is not None and daemon_uid != policy.daemon_uid:
        policy = Policy(**{**policy.__dict__, "daemon_uid": daemon_uid})
    return policy.admin_refusal(session.uid, getattr(session, "gid", -1), op)


def check_admin(session: "Session", op: str, policy: Policy | None = None) -> None:
    """Raise EPERM with the reason unless ``session`` may perform admin op ``op``."""
    reason = admin_refusal(session, op, policy=policy)
    if reason is not None:
        raise RequestError(ErrorCode.EPERM, reason)


def check_priority(session: "Session", priority: str, policy: Policy | None = None) -> None:
    """EPERM unless ``priority`` is within the session's user's priority ceiling."""
    policy = policy or _active
    if session.uid in (0, policy.daemon_uid) and session.uid not in policy.quotas:
        return  # root and the daemon's own user: any class, unless the policy sets their ceiling
    ceiling = policy.quota_for(session.uid).priority_ceiling
    if PRIORITIES.index(priority) > PRIORITIES.index(ceiling):
        raise RequestError(ErrorCode.EPERM, f"priority {priority!r} is above uid {session.uid}'s ceiling "
                                            f"{ceiling!r} (quotas priority_ceiling in {policy.source or 'the default policy'})")


def weight_for(session: "Session", weight: int, policy: Policy | None = None) -> int:
    """A context's fair-share weight: what the client asked for times its user's ``share``."""
    return weight * (policy or _active).share(session.uid)


def memory_limit(sessions, session: "Session", policy: Policy | None = None) -> tuple[int | None, int]:
    """(the user's memory quota or None, bytes all of the user's sessions hold)."""
    quota = (policy or _active).quota_for(session.uid).memory
    if quota is None:
        return None, 0
    return quota, sum(s.memory for s in sessions.of_uid(session.uid))


def check_memory(sessions, session: "Session", charge: int, policy: Policy | None = None) -> None:
    """EDQUOT unless the session's user may hold ``charge`` more bytes of device memory."""
    policy = policy or _active
    quota, used = memory_limit(sessions, session, policy)
    if quota is not None and used + charge > quota:
        raise RequestError(ErrorCode.EDQUOT, f"{charge} more bytes would bring uid {session.uid}'s sessions to "
                                             f"{used + charge} bytes of the user's {quota}-byte memory quota "
                                             f"(quotas in {policy.source}); free buffers or unload models first")


def check_jobs(sessions, session: "Session", retry_after_ms: int, policy: Policy | None = None,
               jobs: int = 1) -> None:
    """EAGAIN (retryable, with a hint) unless ``jobs`` more jobs fit the session's user's quota of
    jobs in flight."""
    policy = policy or _active
    quota = policy.quota_for(session.uid).jobs_in_flight
    if quota is None:
        return
    in_flight = sum(s.jobs_in_flight for s in sessions.of_uid(session.uid))
    if in_flight + jobs > quota:
        raise RequestError(ErrorCode.EAGAIN, f"uid {session.uid} has {in_flight} jobs in flight, its quota "
                                             f"(quotas jobs_in_flight in {policy.source}); retry in about "
                                             f"{retry_after_ms} ms, or after waiting for one",
                           retry_after_ms=retry_after_ms)


def check_sessions(sessions, identity: Identity | None, limits, policy: Policy | None = None) -> None:
    """Refuse a new session (hello) past ``limits.max_sessions``, into the ``limits.admin_sessions``
    kept for admins (who may kill_client) unless ``identity`` is one, or past its user's session
    quota.  A full daemon is EAGAIN (retryable: other users' sessions end); a full quota is EDQUOT,
    not retryable: only the user can end its own sessions (its processes, or ``npuctl kill-client``)."""
    policy = policy or _active
    uid, gid = (identity.uid, identity.gid) if identity is not None else (-1, -1)
    total, most = len(sessions), limits.max_sessions
    if total >= most:
        raise RequestError(ErrorCode.EAGAIN, f"npud serves at most {most} sessions (limits.max_sessions) and all "
                                             "are open; retry later", retry_after_ms=1000)
    if total >= most - limits.admin_sessions and policy.admin_refusal(uid, gid, "kill_client") is not None:
        raise RequestError(ErrorCode.EAGAIN, f"npud serves at most {most} sessions and {total} are open; the "
                                             f"last {limits.admin_sessions} are kept for admins "
                                             "(limits.admin_sessions); retry later", retry_after_ms=1000)
    quota = policy.session_quota(uid, most)
    if quota is not None and sessions.count_of_uid(uid) >= quota:
        where = (f"[quotas] sessions in {policy.source}" if policy.quota_for(uid).sessions is not None
                 else f"the default, a quarter of limits.max_sessions; set [quotas] sessions in "
                      f"{policy.source or 'a policy file'} to change it")
        raise RequestError(ErrorCode.EDQUOT, f"uid {uid} already has {quota} sessions open, its quota ({where}); "
                                             "close some first: each npu.connect holds one until close() or "
                                             "its process exits (`npuctl clients` lists them)")


# --- loading -----------------------------------------------------------------------------


def _check_keys(table: Any, allowed: set[str], where: str) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")
    return table


def _uid(value: Any, where: str) -> int:
    if type(value) is int:
        if not 0 <= value <= MAX_ID:
            raise ConfigError(f"{where}: uid {value} out of range (0 to {MAX_ID})")
        return value
    if isinstance(value, str) and value:
        if value.isdigit():
            return _uid(int(value), where)
        try:
            return pwd.getpwnam(value).pw_uid
        except KeyError:
            raise ConfigError(f"{where}: no user named {value!r} on this system") from None
    raise ConfigError(f"{where}: expected a user name or a uid, got {value!r}")


def _gid(value: Any, where: str) -> int:
    if type(value) is int:
        if not 0 <= value <= MAX_ID:
            raise ConfigError(f"{where}: gid {value} out of range (0 to {MAX_ID})")
        return value
    if isinstance(value, str) and value:
        if value.isdigit():
            return _gid(int(value), where)
        try:
            return grp.getgrnam(value).gr_gid
        except KeyError:
            raise ConfigError(f"{where}: no group named {value!r} on this system") from None
    raise ConfigError(f"{where}: expected a group name or a gid, got {value!r}")


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected an array, got {value!r}")
    return value


def _grant(table: Any, where: str, extra: set[str] = frozenset()) -> Grant:
    table = _check_keys(table, {"users", "groups"} | extra, where)
    uids = [_uid(v, f"{where}.users[{i}]") for i, v in enumerate(_list(table.get("users", []), f"{where}.users"))]
    gids = [_gid(v, f"{where}.groups[{i}]")
            for i, v in enumerate(_list(table.get("groups", []), f"{where}.groups"))]
    return Grant(frozenset(uids), frozenset(gids))


def _quota(table: Any, where: str, base: Quota) -> Quota:
    table = _check_keys(table, {"memory", "jobs_in_flight", "sessions", "priority_ceiling", "share"}, where)
    out = dict(base.__dict__)
    if "memory" in table:
        memory = parse_size(table["memory"], f"{where}.memory")
        if memory <= 0:
            raise ConfigError(f"{where}.memory: must be at least 1 byte")
        out["memory"] = memory
    if "jobs_in_flight" in table:
        jobs = table["jobs_in_flight"]
        if type(jobs) is not int or not 1 <= jobs <= 1_000_000:
            raise ConfigError(f"{where}.jobs_in_flight: expected a positive integer, got {jobs!r}")
        out["jobs_in_flight"] = jobs
    if "sessions" in table:
        sessions = table["sessions"]
        if type(sessions) is not int or not 1 <= sessions <= 1_000_000:
            raise ConfigError(f"{where}.sessions: expected a positive integer, got {sessions!r}")
        out["sessions"] = sessions
    if "priority_ceiling" in table:
        if table["priority_ceiling"] not in PRIORITIES:
            raise ConfigError(f"{where}.priority_ceiling: expected one of {', '.join(PRIORITIES)}, "
                              f"got {table['priority_ceiling']!r}")
        out["priority_ceiling"] = table["priority_ceiling"]
    if "share" in table:
        share = table["share"]
        if type(share) is not int or not 1 <= share <= 1000:
            raise ConfigError(f"{where}.share: expected an integer weight from 1 to 1000, got {share!r}")
        out["share"] = share
    return Quota(**out)


def read_public_key(path: str, where: str) -> bytes:
    """The Z85 public key of a zmq.auth certificate file (public or secret)."""
    import zmq.auth

    try:
        public, _secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: cannot read a zmq.auth certificate from {path}: {exc}") from None
    if not public or not _Z85.match(public.decode("ascii", "replace")):
        raise ConfigError(f"{where}: {path} holds no valid public-key")
    return public


def _curve_clients(items: Any, where: str) -> dict[bytes, CurveClient]:
    out: dict[bytes, CurveClient] = {}
    names = set()
    for i, item in enumerate(_list(items, where)):
        at = f"{where}[{i}]"
        item = _check_keys(item, {"name", "public_key", "public_key_file", "user"}, at)
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"{at}.name: expected 1-64 characters of [A-Za-z0-9_.-], got {name!r}")
        if ("public_key" in item) == ("public_key_file" in item):
            raise ConfigError(f"{at}: give exactly one of public_key or public_key_file")
        if "public_key" in item:
            key = item["public_key"]
            if not isinstance(key, str) or not _Z85.match(key):
                raise ConfigError(f"{at}.public_key: expected a Z85 CURVE public key (40 characters), "
                                  f"got {key!r}")
            key = key.encode("ascii")
        else:
            path = item["public_key_file"]
            if not isinstance(path, str) or not path:
                raise ConfigError(f"{at}.public_key_file: expected a file path, got {path!r}")
            key = read_public_key(path, f"{at}.public_key_file")
        if "user" not in item:
            raise ConfigError(f"{at}.user: missing (the user name or uid whose rights this key has)")
        uid = _uid(item["user"], f"{at}.user")
        if key in out:
            raise ConfigError(f"{at}.public_key: the same key as {out[key].name!r}")
        if name in names:
            raise ConfigError(f"{at}.name: {name!r} is used twice")
        names.add(name)
        out[key] = CurveClient(name, key, uid)
    return out


def from_dict(data: dict[str, Any], source: str = "") -> Policy:
    _check_keys(data, {"connect", "admin", "quotas", "curve_clients"}, "policy")
    kw: dict[str, Any] = {"source": source}
    if "connect" in data:
        kw["connect"] = _grant(data["connect"], "connect")
    if "admin" in data:
        admin = _check_keys(data["admin"], {"users", "groups", *ADMIN_OPS}, "admin")
        kw["admin"] = _grant({k: v for k, v in admin.items() if k in ("users", "groups")}, "admin")
        kw["admin_ops"] = {op: _grant(admin[op], f"admin.{op}") for op in ADMIN_OPS if op in admin}
    if "quotas" in data:
        quotas = _check_keys(data["quotas"], {"default", "users"}, "quotas")
        default = _quota(quotas.get("default", {}), "quotas.default", Quota())
        users = _check_keys(quotas.get("users", {}), set(quotas.get("users", {}) or ()), "quotas.users")
        per_uid = {}
        for key, table in users.items():
            uid = _uid(key, f"quotas.users.{key}")
            if uid in per_uid:
                raise ConfigError(f"quotas.users.{key}: uid {uid} has two tables")
            per_uid[uid] = _quota(table, f"quotas.users.{key}", default)
        kw["default_quota"], kw["quotas"] = default, per_uid
    if "curve_clients" in data:
        kw["curve_clients"] = _curve_clients(data["curve_clients"], "curve_clients")
    return Policy(**kw)


def load(path: str | Path | None) -> Policy:
    """Read a policy file (the default policy when path is None or empty)."""
    if not path:
        return DEFAULT
    try:
        return load_toml(path, "policy file", lambda data: from_dict(data, str(path)))
    except ConfigError as exc:
        raise ConfigError(f"policy: {exc}") from None
