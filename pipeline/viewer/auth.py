"""Who may use the viewer: demo users from $CXR_USERS, or a users file of salted password hashes.

`CXR_USERS="name:password,..."` is for a demo on one machine. For anything longer-lived, keep users
in a file (default `.cxr/users.json`, or $CXR_USERS_FILE) that holds only scrypt hashes with a
random salt per user, and add users with

    python -m pipeline.viewer.auth add NAME          # asks for the password twice

Both sources may be used at once. Passwords are compared in constant time.
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
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.io import write_text

USERS_ENV = "CXR_USERS"
USERS_FILE_ENV = "CXR_USERS_FILE"
DEFAULT_USERS_FILE = Path(".cxr") / "users.json"
_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}


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
    # keyed digests of credentials already verified against a stored hash, so an API client sending
    # HTTP Basic with every request does not pay a ~50 ms scrypt each time (the key lives in memory only)
    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    _verified: set = field(default_factory=set, repr=False)

    @classmethod
    def load(cls, users_file: str | os.PathLike | None = None) -> "Users":
        path = Path(users_file or os.environ.get(USERS_FILE_ENV) or DEFAULT_USERS_FILE)
        hashed = read_users_file(path) if path.is_file() else {}
        return cls(parse_env_users(os.environ.get(USERS_ENV, "")), hashed)

    def __bool__(self) -> bool:
        return bool(self.plain or self.hashed)

    def check(self, name: str | None, password: str | None) -> bool:
        if not name or password is None:
            return False
        ok = False
        if name in self.plain:
            ok = hmac.compare_digest(self.plain[name].encode(), password.encode())
        if not ok and name in self.hashed:
            token = hmac.new(self._key, f"{name}\0{password}\0{self.hashed[name]}".encode(), "sha256").digest()
            if token in self._verified:
                return True
            ok = verify_password(password, self.hashed[name])
            if ok and len(self._verified) < 1024:
                self._verified.add(token)
        return ok


def read_users_file(path: str | os.PathLike) -> dict[str, str]:
    data = json.loads(Path(path).read_text() or "{}")
    users = data.get("users", {}) if isinstance(data, dict) else {}
    return {str(k): str(v) for k, v in users.items()}


def add_user(path: str | os.PathLike, name: str, password: str) -> None:
    """Add or replace a user in the users file (created 0600 if missing); written atomically."""
    if not name or ":" in name or "," in name:
        raise ValueError("a user name must be non-empty and contain no ':' or ','")
    if len(password) < 8:
        raise ValueError("a password must have at least 8 characters")
    path = Path(path)
    users = read_users_file(path) if path.is_file() else {}
    users[name] = hash_password(password)
    write_text(path, json.dumps({"users": users}, indent=2) + "\n")
    os.chmod(path, 0o600)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.viewer.auth",
                                     description="Manage the viewer's users file (salted scrypt hashes).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    add = sub.add_parser("add", help="add or replace a user")
    add.add_argument("name")
    add.add_argument("--file", default=None, help=f"users file (default ${USERS_FILE_ENV} or {DEFAULT_USERS_FILE})")
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    args = parser.parse_args(argv)
    path = Path(args.file or os.environ.get(USERS_FILE_ENV) or DEFAULT_USERS_FILE)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass(f"password for {args.name}: ")
        if getpass.getpass("again: ") != password:
            sys.exit("error: the passwords differ")
    try:
        add_user(path, args.name, password)
    except ValueError as err:
        sys.exit(f"error: {err}")
    sys.stderr.write(f"user {args.name!r} saved in {path}\n")


if __name__ == "__main__":
    main()
