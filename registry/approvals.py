"""Approvals: promotion to a protected alias needs a second identity.

`protect_alias` marks ``name@alias`` protected: from then on `promote` and `set_alias` move
it only for an approved request, or with ``force`` and a reason (an audited emergency
override). `request_promotion` records who asks for which version; `approve_promotion`,
by any identity but the requester's, runs the promotion gate and moves the alias;
`reject_promotion` closes a request. Identities are the registry's (the OS user on the
command line; the bearer token's name over HTTP). Every step is in the audit log.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from .models import _check_alias, get_version, promote
from .rollouts import end_if_promoted
from .store import Home, NotFoundError, RegistryError, _current_user, open_home

_SCHEMA = """
CREATE TABLE IF NOT EXISTS protected_aliases (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    PRIMARY KEY (name, alias)
);
CREATE TABLE IF NOT EXISTS promotion_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    alias TEXT NOT NULL,
    requester TEXT NOT NULL,
    reason TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL DEFAULT 'pending',   -- pending | approved | rejected
    decider TEXT,
    created_at REAL NOT NULL,
    decided_at REAL
);
"""


@dataclass(frozen=True)
class PromotionRequest:
    id: int
    name: str
    version: int
    alias: str
    requester: str
    reason: str
    state: str
    decider: str | None
    created_at: float
    decided_at: float | None

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _ensure_tables(home: Home) -> None:
    # Homes made before approvals existed get the tables on first use.
    if not home.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'promotion_requests'").fetchone():
        home.db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")


def protect_alias(home: Home | str | os.PathLike | None, name: str, alias: str, protected: bool = True,
                  reason: str = "") -> None:
    home = open_home(home)
    _ensure_tables(home)
    _check_alias(alias)
    with home.transaction() as db:
        if protected:
            db.execute("INSERT OR IGNORE INTO protected_aliases (name, alias) VALUES (?, ?)", (name, alias))
        else:
            db.execute("DELETE FROM protected_aliases WHERE name = ? AND alias = ?", (name, alias))
        home.audit("model.alias.protect" if protected else "model.alias.unprotect", f"{name}@{alias}", reason)


def _request(home: Home, request_id: int) -> PromotionRequest:
    row = home.db.execute("SELECT * FROM promotion_requests WHERE id = ?", (request_id,)).fetchone()
    if row is None:
        raise NotFoundError(f"no promotion request {request_id} (vivace models requests lists them)")
    return PromotionRequest(**dict(row))


def get_request(home: Home | str | os.PathLike | None, request_id: int) -> PromotionRequest:
    home = open_home(home)
    _ensure_tables(home)
    return _request(home, request_id)


def list_requests(home: Home | str | os.PathLike | None, state: str | None = "pending") -> list[PromotionRequest]:
    home = open_home(home)
    _ensure_tables(home)
    sql, params = "SELECT id FROM promotion_requests", []
    if state:
        sql, params = sql + " WHERE state = ?", [state]
    return [_request(home, row[0]) for row in home.db.execute(sql + " ORDER BY id", params).fetchall()]


def request_promotion(home: Home | str | os.PathLike | None, name: str, version: int, alias: str,
                      reason: str = "", requester: str | None = None) -> PromotionRequest:
    """Ask for `name@alias` to move to `version`; someone else must approve it."""
    home = open_home(home)
    _ensure_tables(home)
    _check_alias(alias)
    requester = requester or _current_user()
    with home.transaction() as db:
        get_version(home, f"{name}/{version}")
        pending = db.execute("SELECT id FROM promotion_requests WHERE name = ? AND alias = ? AND version = ? "
                             "AND state = 'pending'", (name, alias, version)).fetchone()
        if pending is not None:
            raise RegistryError(f"promotion request {pending[0]} already asks for {name}/{version} at @{alias}")
        cursor = db.execute(
            "INSERT INTO promotion_requests (name, version, alias, requester, reason, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?)", (name, version, alias, requester, reason, time.time()))
        request_id = int(cursor.lastrowid or 0)
        home.audit("model.promote.requested", f"{name}/{version}", reason,
                   {"request": request_id, "alias": alias, "requester": requester})
    return _request(home, request_id)


def _check_decider(request: PromotionRequest, decider: str, verb: str) -> None:
    if request.state != "pending":
        raise RegistryError(f"promotion request {request.id} is already {request.state}")
    if decider == request.requester:
        raise RegistryError(f"promotion request {request.id} was made by {decider!r}: another identity must {verb} it")


def _decide(home: Home, request_id: int, decider: str, state: str) -> PromotionRequest:
    request = _request(home, request_id)
    _check_decider(request, decider, "approve" if state == "approved" else "reject")
    home.db.execute("UPDATE promotion_requests SET state = ?, decider = ?, decided_at = ? WHERE id = ?",
                    (state, decider, time.time(), request_id))
    return request


def approve_promotion(home: Home | str | os.PathLike | None, request_id: int, reason: str = "",
                      approver: str | None = None, metric: str = "auc",
                      force: bool = False) -> tuple[list, int | None]:
    """Approve a pending request (not the requester's own) and promote through the gate;
    returns the gate's (checks, previous version). A refused gate leaves the request
    pending (PromotionRefused)."""
    home = open_home(home)
    _ensure_tables(home)
    approver = approver or _current_user()
    request = _request(home, request_id)
    _check_decider(request, approver, "approve")  # before the gate runs
    checks, previous = promote(home, request.name, request.version, request.alias, metric=metric, force=force,
                               reason=reason or request.reason, approved=True)
    with home.transaction():
        _decide(home, request_id, approver, "approved")
        home.audit("model.promote.approved", f"{request.name}/{request.version}", reason,
                   {"request": request_id, "alias": request.alias, "requester": request.requester,
                    "approver": approver, "previous": previous})
    end_if_promoted(home, request.name, request.alias, request.version,
                    {"request": request_id, "approver": approver})
    return checks, previous


def reject_promotion(home: Home | str | os.PathLike | None, request_id: int, reason: str = "",
                     decider: str | None = None) -> PromotionRequest:
    home = open_home(home)
    _ensure_tables(home)
    decider = decider or _current_user()
    with home.transaction():
        request = _decide(home, request_id, decider, "rejected")
        home.audit("model.promote.rejected", f"{request.name}/{request.version}", reason,
                   {"request": request_id, "alias": request.alias, "requester": request.requester,
                    "decider": decider})
    return _request(home, request_id)
