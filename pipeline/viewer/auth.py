"""Who may use the viewer: demo users from $CXR_USERS, or a users file of salted password hashes.

`CXR_USERS="name:password,..."` is for a demo on one machine. For anything longer-lived, keep users
in a file (default `.cxr/users.json`, or $CXR_USERS_FILE) that holds only scrypt hashes with a
random salt per user, and add users with

    python -m pipeline.viewer.auth add NAME [--role reviewer]   # asks for the password twice
    python -m pipeline.viewer.auth role NAME reviewer           # or viewer

Both sources may be used at once.

Every user has a role: `viewer` (predict only; the default, so a users file written before roles
existed keeps working, everyone in it a viewer) or `reviewer` (also the review mode and its REST
routes, which write clinician feedback). Roles live in the users file (`"roles": {name: role}`,
beside `"users"`); demo users named in $CXR_REVIEWERS ("alice,bob") are reviewers. Passwords are compared in constant time, and every failed check
costs one scrypt whether the name exists or not (an unknown name is checked against a dummy hash),
so response times do not tell which names are users.

Failed logins are throttled (`LoginThrottle`, shared by the REST API and the Gradio login): after
$CXR_AUTH_MAX_FAILURES (5) failures for one user name, or $CXR_AUTH_MAX_FAILURES_PER_IP (20) from one
client address, within $CXR_AUTH_WINDOW_S (300) seconds, every further attempt from that client or
for that name, right or wrong, is refused (HTTP 429 with Retry-After) until the oldest of those
failures is older than the window. Refused attempts are not counted, so a lock-out ends on its own.
A user name's lock does not apply to a client address that has logged in as that user before (within
$CXR_AUTH_REMEMBER_S, 30 days): anyone can lock a known name out, but not away from the desk its
owner uses; a guesser at a new address is still locked, and the per-address limit applies to all.
"""
from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import json
import os
import secrets
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import write_text
from pipeline.viewer.limits import env_number

USERS_ENV = "CXR_USERS"
REVIEWERS_ENV = "CXR_REVIEWERS"
VIEWER, REVIEWER = "viewer", "reviewer"
ROLES = (VIEWER, REVIEWER)
USERS_FILE_ENV = "CXR_USERS_FILE"
DEFAULT_USERS_FILE = Path(".cxr") / "users.json"
_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}
MAX_FAILURES_ENV, MAX_FAILURES_PER_IP_ENV, WINDOW_ENV = ("CXR_AUTH_MAX_FAILURES", "CXR_AUTH_MAX_FAILURES_PER_IP",
                                                         "CXR_AUTH_WINDOW_S")
REMEMBER_ENV = "CXR_AUTH_REMEMBER_S"


def hash_password(password: str, salt: bytes | None = None) -> str:
    """'scrypt$n$r$p$salt$hash' (base64) for storage; a fresh random salt unless one is given."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    return f"scrypt${_SCRYPT['n']}${_SCRYPT['r']}${_SCRYPT['p']}${b64(salt)}${b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(base64.b64decode(digest)))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


def parse_env_users(value: str) -> dict[str, str]:
    """'alice:pw1,bob:pw2' -> {name: password}; a malformed entry is an error naming its position."""
    users = {}
    for k, item in enumerate(filter(None, (s.strip() for s in value.split(",")))):
        name, sep, password = item.partition(":")
        if not sep or not name or not password:
            raise ValueError(f"{USERS_ENV}: entry {k + 1} is not 'name:password'")
        users[name] = password
    return users


@dataclass
class Users:
    """The accounts the viewer accepts: plain demo passwords (from the environment) and stored hashes."""
    plain: dict[str, str] = field(default_factory=dict)
    hashed: dict[str, str] = field(default_factory=dict)
    roles: dict[str, str] = field(default_factory=dict)   # name -> role; absent: VIEWER
    # keyed digests of credentials already verified against a stored hash, so an API client sending
    # HTTP Basic with every request does not pay a ~50 ms scrypt each time (the key lives in memory only)
    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    _verified: set = field(default_factory=set, repr=False)
    # what a wrong name is checked against, so that it costs what a wrong password costs
    _dummy: str = field(default_factory=lambda: hash_password(secrets.token_urlsafe(16)), repr=False)

    @classmethod
    def load(cls, users_file: str | os.PathLike | None = None) -> "Users":
        path = Path(users_file or os.environ.get(USERS_FILE_ENV) or DEFAULT_USERS_FILE)
        hashed = read_users_file(path) if path.is_file() else {}
        roles = read_roles(path) if path.is_file() else {}
        roles.update({name: REVIEWER for name in parse_names(os.environ.get(REVIEWERS_ENV, ""))})
        return cls(parse_env_users(os.environ.get(USERS_ENV, "")), hashed, roles)

    def __bool__(self) -> bool:
        return bool(self.plain or self.hashed)

    def role(self, name: str | None) -> str | None:
        """The role of an existing user (VIEWER unless recorded otherwise); None for anyone else."""
        if not name or (name not in self.plain and name not in self.hashed):
            return None
        return REVIEWER if self.roles.get(name) == REVIEWER else VIEWER

    def check(self, name: str | None, password: str | None) -> bool:
        """Blocking (one scrypt unless the credential was verified before): call it off the event loop."""
        name, password = name or "", password if password is not None else ""
        if name in self.plain and hmac.compare_digest(self.plain[name].encode(), password.encode()):
            return True
        if name in self.hashed:
            token = hmac.new(self._key, f"{name}\0{password}\0{self.hashed[name]}".encode(), "sha256").digest()
            if token in self._verified:
                return True
            ok = verify_password(password, self.hashed[name])
            if ok and len(self._verified) < 1024:
                self._verified.add(token)
            return ok
        verify_password(password, self._dummy)   # unknown name (or a wrong demo password): the same cost
        return False


class LoginThrottle:
    """Failed logins in a sliding window, per user name and per client address.

    `retry_after(client, name)` is None when an attempt may go ahead, else the whole seconds until it
    may; `failed(client, name)` records a wrong password (name None: a malformed credential).
    Thread-safe; memory is bounded (expired entries are dropped, at most `max_keys` kept).
    """

    def __init__(self, max_failures: int = 5, window_s: float = 300.0, max_failures_per_ip: int | None = None,
                 clock=time.monotonic, max_keys: int = 10_000, remember_s: float = 30 * 86400.0):
        if max_failures < 1 or window_s <= 0:
            raise ValueError("the login throttle needs max_failures >= 1 and window_s > 0")
        self.max_failures, self.window_s = int(max_failures), float(window_s)
        self.max_failures_per_ip = int(max_failures_per_ip or 4 * max_failures)
        self.clock, self.max_keys, self.remember_s = clock, max_keys, float(remember_s)
        self._failures: dict[tuple[str, str], deque] = {}
        self._known: dict[tuple[str, str], float] = {}   # (client, user key) -> time of its last good login
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls) -> "LoginThrottle":
        per_user = int(env_number(MAX_FAILURES_ENV, 5))
        return cls(per_user, env_number(WINDOW_ENV, 300.0),
                   int(env_number(MAX_FAILURES_PER_IP_ENV, 4 * per_user)),
                   remember_s=env_number(REMEMBER_ENV, 30 * 86400.0))

    @staticmethod
    def _client(client: str | None) -> str:
        return (client or "unknown")[:64]

    @staticmethod
    def _user(name: str) -> str:
        return hashlib.sha256(name.encode("utf-8", "replace")).hexdigest()[:32]  # any length costs a few bytes

    def _keys(self, client: str | None, name: str | None) -> list[tuple[tuple[str, str], int]]:
        keys = [(("ip", self._client(client)), self.max_failures_per_ip)]
        if name:
            keys.append((("user", self._user(name)), self.max_failures))
        return keys

    def _known_client(self, client: str | None, name: str | None, now: float) -> bool:
        seen = self._known.get((self._client(client), self._user(name))) if name else None
        return seen is not None and now - seen < self.remember_s

    def succeeded(self, client: str | None, name: str) -> None:
        """Remember that `client` logged in as `name`: that user's lock will not apply to it."""
        now = self.clock()
        with self._lock:
            if len(self._known) >= self.max_keys:
                for key in [k for k, t in self._known.items() if now - t >= self.remember_s]:
                    del self._known[key]
                while len(self._known) >= self.max_keys:
                    del self._known[next(iter(self._known))]
            key = (self._client(client), self._user(name))
            self._known.pop(key, None)   # re-inserted last: the dict's order is the age order
            self._known[key] = now

    def _recent(self, key: tuple[str, str], now: float) -> deque | None:
        times = self._failures.get(key)
        while times and now - times[0] >= self.window_s:
            times.popleft()
        if times is not None and not times:
            del self._failures[key]
            return None
        return times

    def retry_after(self, client: str | None, name: str | None) -> int | None:
        now = self.clock()
        wait = 0.0
        with self._lock:
            known = self._known_client(client, name, now)
            for key, limit in self._keys(client, name):
                if known and key[0] == "user":
                    continue   # the user's own desk: only its address's limit applies
                times = self._recent(key, now)
                if times is not None and len(times) >= limit:
                    # the attempt may go ahead once the failures in the window are fewer than the limit
                    wait = max(wait, times[len(times) - limit] + self.window_s - now)
        return max(1, int(wait + 0.999)) if wait > 0 else None

    def failed(self, client: str | None, name: str | None) -> None:
        now = self.clock()
        keys = self._keys(client, name)
        with self._lock:
            if len(self._failures) + len(keys) > self.max_keys:
                for key in list(self._failures):
                    self._recent(key, now)
                while self._failures and len(self._failures) + len(keys) > self.max_keys:
                    del self._failures[next(iter(self._failures))]  # still full: forget the oldest entries
            for key, limit in keys:
                times = self._failures.setdefault(key, deque())
                times.append(now)
                while len(times) > limit:  # only the last `limit` failures matter
                    times.popleft()


class TooManyFailures(Exception):
    """A login attempt refused by the throttle; `retry_after` whole seconds until one may go ahead."""

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed logins: try again in {retry_after} s")
        self.retry_after = retry_after


def log_in(users: Users, throttle: LoginThrottle, client: str | None, name: str | None, password: str | None) -> bool:
    """The one login check behind both doors (REST and Gradio): throttled, verified, outcome recorded.

    Blocking (scrypt): run it off the event loop. Raises TooManyFailures while locked out."""
    wait = throttle.retry_after(client, name)
    if wait is not None:
        raise TooManyFailures(wait)
    if name and users.check(name, password):
        throttle.succeeded(client, name)
        return True
    if not name:
        users.check("", password or "")   # a malformed credential costs what a wrong one does
    throttle.failed(client, name or None)
    return False


def parse_names(value: str) -> list[str]:
    """'alice, bob' -> ['alice', 'bob']."""
    return [s.strip() for s in value.split(",") if s.strip()]


def _read(path: str | os.PathLike) -> dict:
    data = json.loads(Path(path).read_text() or "{}")
    return data if isinstance(data, dict) else {}


def read_users_file(path: str | os.PathLike) -> dict[str, str]:
    users = _read(path).get("users", {})
    return {str(k): str(v) for k, v in users.items()} if isinstance(users, dict) else {}


def read_roles(path: str | os.PathLike) -> dict[str, str]:
    """The users file's roles (a file from before roles has none: everyone a viewer); unknown roles dropped."""
    roles = _read(path).get("roles", {})
    return {str(k): str(v) for k, v in roles.items() if v in ROLES} if isinstance(roles, dict) else {}


def _write_users_file(path: Path, users: dict[str, str], roles: dict[str, str]) -> None:
    roles = {k: v for k, v in sorted(roles.items()) if k in users and v != VIEWER}   # viewer is the default
    write_text(path, json.dumps({"users": users, "roles": roles}, indent=2) + "\n")
    os.chmod(path, 0o600)


def _check_role(role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"a role is one of {', '.join(ROLES)}, not {role!r}")
    return role


def add_user(path: str | os.PathLike, name: str, password: str, role: str | None = None) -> None:
    """Add or replace a user in the users file (created 0600 if missing); written atomically. `role`
    None keeps a replaced user's role (a new user is a viewer)."""
    if not name or ":" in name or "," in name:
        raise ValueError("a user name must be non-empty and contain no ':' or ','")
    if len(password) < 8:
        raise ValueError("a password must have at least 8 characters")
    path = Path(path)
    users = read_users_file(path) if path.is_file() else {}
    roles = read_roles(path) if path.is_file() else {}
    users[name] = hash_password(password)
    if role is not None:
        roles[name] = _check_role(role)
    _write_users_file(path, users, roles)


def set_role(path: str | os.PathLike, name: str, role: str) -> None:
    """Give an existing user of the users file `role`."""
    path = Path(path)
    users = read_users_file(path) if path.is_file() else {}
    if name not in users:
        raise ValueError(f"no user {name!r} in {path}")
    roles = read_roles(path)
    roles[name] = _check_role(role)
    _write_users_file(path, users, roles)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.viewer.auth",
                                     description="Manage the viewer's users file (salted scrypt hashes).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    file_help = f"users file (default ${USERS_FILE_ENV} or {DEFAULT_USERS_FILE})"
    add = sub.add_parser("add", help="add or replace a user")
    add.add_argument("name")
    add.add_argument("--file", default=None, help=file_help)
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    add.add_argument("--role", choices=ROLES, default=None,
                     help=f"{VIEWER} (predict only; a new user's default) or {REVIEWER} (also review mode)")
    role = sub.add_parser("role", help="set a user's role")
    role.add_argument("name")
    role.add_argument("role", choices=ROLES)
    role.add_argument("--file", default=None, help=file_help)
    args = parser.parse_args(argv)
    path = Path(args.file or os.environ.get(USERS_FILE_ENV) or DEFAULT_USERS_FILE)
    if args.cmd == "role":
        try:
            set_role(path, args.name, args.role)
        except ValueError as err:
            sys.exit(f"error: {err}")
        sys.stderr.write(f"user {args.name!r} is a {args.role} in {path}\n")
        return
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            sys.exit("error: the passwords differ")
    try:
        add_user(path, args.name, password, args.role)
    except ValueError as err:
        sys.exit(f"error: {err}")
    sys.stderr.write(f"user {args.name!r} saved in {path}\n")


if __name__ == "__main__":
    main()
