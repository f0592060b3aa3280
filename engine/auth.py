"""Optional bearer-token authentication with scopes, and the server's audit log.

Tokens are random (`vvc_` + 32 random bytes, URL-safe) and shown once, when created;
the server stores only their SHA-256 digests, in `<home>/auth/tokens.json` (mode 0600,
replaced atomically). A presented token is hashed before it is looked up, so how long a
lookup takes depends on the digest of what was sent, never on how many leading
characters of a real token were guessed; the final match is `hmac.compare_digest`.

Scopes:
  infer  POST .../infer
  read   metadata, config, statistics, drift, /metrics, the OpenAPI document, repository index
  admin  repository load / unload, moving an alias
Health endpoints (/v2/health/live, /v2/health/ready) stay open for load balancers.

The server re-reads the token file when it changes, so `vivace auth revoke` takes effect
within a second, without a restart. Authentication failures and admin actions are
appended to the audit log (JSON lines, size-capped with rotation).
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import hmac
import os
import secrets
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

SCOPES = ("infer", "read", "admin", "approve")  # approve: promotion requests of others
TOKEN_PREFIX = "vvc_"
BEARER = b"bearer"


def _digest(token: bytes) -> str:
    return hashlib.sha256(token).hexdigest()


class TokenRecord(msgspec.Struct, frozen=True):
    name: str
    digest: str
    scopes: tuple[str, ...]
    created_at: float
    expires_at: float | None = None


class TokenFile(msgspec.Struct):
    tokens: list[TokenRecord] = []


@dataclass(frozen=True)
class Principal:
    """Who sent a request: the token's name and what it may do."""

    name: str
    scopes: frozenset[str]
    expires_at: float | None


def tokens_path(home: str | os.PathLike) -> Path:
    return Path(home) / "auth" / "tokens.json"


class TokenStore:
    """The token file: create, list, revoke. Writes are atomic (temp file + rename)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def records(self) -> list[TokenRecord]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        try:
            return msgspec.json.decode(data, type=TokenFile).tokens
        except msgspec.DecodeError as exc:
            raise ValueError(f"{self.path}: not a valid token file: {exc}") from None

    @contextlib.contextmanager
    def _locked(self):
        """Serialise read-modify-write of the token file between processes (a create running
        next to a revoke must not write the revoked token back)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def create(self, name: str, scopes: list[str], expires_in_s: float | None = None) -> str:
        """Add a token and return it (the only time it is ever shown)."""
        with self._locked():
            return self._create(name, scopes, expires_in_s)

    def _create(self, name: str, scopes: list[str], expires_in_s: float | None) -> str:
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise ValueError(f"token name must be letters, digits, '-', '_' or '.', got {name!r}")
        unknown = sorted(set(scopes) - set(SCOPES))
        if unknown or not scopes:
            raise ValueError(f"scopes must be a non-empty subset of {', '.join(SCOPES)}; got {scopes}")
        if expires_in_s is not None and expires_in_s <= 0:
            raise ValueError("a token's lifetime must be positive")
        records = self.records()
        if any(r.name == name for r in records):
            raise ValueError(f"a token named {name!r} exists; revoke it first")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        now = time.time()
        records.append(TokenRecord(name, _digest(token.encode()), tuple(sorted(set(scopes))), now,
                                   now + expires_in_s if expires_in_s else None))
        self._write(records)
        return token

    def revoke(self, name: str) -> None:
        with self._locked():
            self._revoke(name)

    def _revoke(self, name: str) -> None:
        records = self.records()
        kept = [r for r in records if r.name != name]
        if len(kept) == len(records):
            raise ValueError(f"no token named {name!r}")
        self._write(kept)

    def _write(self, records: list[TokenRecord]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(msgspec.json.format(msgspec.json.encode(TokenFile(records))))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)


class Authenticator:
    """Checks `Authorization: Bearer ...` headers against the token file."""

    def __init__(self, path: str | os.PathLike):
        self.store = TokenStore(path)
        self._stamp: tuple[int, int, int] | None = None
        self._by_digest: dict[str, tuple[TokenRecord, Principal]] = {}
        self.generation = 0  # bumped on every reload: connections drop cached principals
        self.reload()
        if not self._by_digest:
            raise ValueError(f"authentication is on but {self.store.path} holds no tokens "
                             "(create one with `vivace auth create-token`)")

    def reload(self) -> None:
        """Re-read the token file when it changed (revocations apply without a restart)."""
        try:
            st = self.store.path.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)  # every write replaces the file: a new inode
        except FileNotFoundError:
            stamp = (0, 0, 0)
        if stamp == self._stamp:
            return
        records = self.store.records()
        self._by_digest = {
            r.digest: (r, Principal(r.name, frozenset(r.scopes), r.expires_at)) for r in records
        }
        self._stamp = stamp
        self.generation += 1

    def grants(self) -> list[tuple[bytes, float, bool, str]]:
        """(SHA-256 digest, expiry or 0, infer scope, name) of every token: what the native
        front end checks requests against (csrc/frontend)."""
        return [(bytes.fromhex(digest), principal.expires_at or 0.0, "infer" in principal.scopes, principal.name)
                for digest, (_, principal) in self._by_digest.items()]

    def authenticate(self, header: bytes | None) -> Principal | str:
        """The principal for an Authorization header value, or why it is refused."""
        if not header:
            return "missing bearer token (send 'Authorization: Bearer <token>')"
        scheme, _, token = header.partition(b" ")
        if scheme.lower() != BEARER:
            return "the Authorization header must use the Bearer scheme"
        token = token.strip()
        digest = _digest(token)
        found = self._by_digest.get(digest)
        if found is None or not hmac.compare_digest(found[0].digest, digest):
            return "invalid or revoked token"
        principal = found[1]
        if principal.expires_at is not None and time.time() >= principal.expires_at:
            return f"token {principal.name!r} has expired"
        return principal


class AuditLog:
    """Append-only JSON lines of security events, capped in size with rotation."""

    def __init__(self, path: str | os.PathLike, max_bytes: int = 16 << 20, backups: int = 5):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.backups = backups
        self._file = None  # opened by the first event: a quiet server writes nothing
        self._encoder = msgspec.json.Encoder()

    def record(self, event: str, **fields: Any) -> None:
        if self._file is None:
            from vivace.monitor.predlog import RotatingFile

            self._file = RotatingFile(self.path, max_bytes=self.max_bytes, backups=self.backups)
        self._file.write(self._encoder.encode({"ts": time.time(), "event": event, **fields}) + b"\n")

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


# -- `vivace auth` ---------------------------------------------------------------------
def register(subparsers) -> None:
    auth = subparsers.add_parser("auth", help="bearer tokens for `vivace serve --auth`",
                                 description="Create, list and revoke bearer tokens (stored hashed in the home).")
    sub = auth.add_subparsers(dest="auth_command", metavar="ACTION", required=True)
    create = sub.add_parser("create-token", help="create a token and print it (shown only once)")
    create.add_argument("name")
    create.add_argument("--scopes", default="infer", help=f"comma-separated: {','.join(SCOPES)} (default: infer)")
    create.add_argument("--expires-days", type=float, default=None)
    create.set_defaults(func=_create)
    listing = sub.add_parser("list", help="token names, scopes and expiry (never the tokens)")
    listing.set_defaults(func=_list)
    revoke = sub.add_parser("revoke", help="revoke a token (a running server stops accepting it within a second)")
    revoke.add_argument("name")
    revoke.set_defaults(func=_revoke)


def _create(args: argparse.Namespace) -> int:
    expires = args.expires_days * 86400 if args.expires_days else None
    token = TokenStore(tokens_path(args.home)).create(args.name, [s for s in args.scopes.split(",") if s], expires)
    print(token)
    print(f"token {args.name!r} created; it is not stored and cannot be shown again", file=sys.stderr)
    return 0


def _list(args: argparse.Namespace) -> int:
    for r in TokenStore(tokens_path(args.home)).records():
        expiry = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.expires_at)) if r.expires_at else "never"
        print(f"{r.name}\t{','.join(r.scopes)}\texpires {expiry}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    TokenStore(tokens_path(args.home)).revoke(args.name)
    print(f"token {args.name!r} revoked", file=sys.stderr)
    return 0
