"""Progressive delivery on a registry alias: canary weights and shadow traffic.

A rollout belongs to one served alias, e.g. ``churn@production``: the alias keeps naming
the stable version, and the rollout names a canary version that takes ``weight`` percent
of that alias's requests (sticky by a request key when ``sticky`` says where to find
one), and/or a shadow version that receives a sampled share of the requests as a copy —
its answers are compared with the stable ones, never returned. Servers following the
alias (`vivace serve NAME@ALIAS`) apply the rollout live, as they follow alias moves.

Each change is one audited registry event: ``rollout.start``, ``rollout.step`` (a new
weight), ``rollout.promote`` (the alias moves to the canary, through the promotion gate,
and the rollout ends) and ``rollout.abort`` (the rollout ends, the alias stays).

With a policy (``steps``), the serving side analyses the rollout itself: once the canary
has answered ``min_requests`` at a step and ``step_seconds`` have passed, it compares the
canary with the stable version (error rate, p99 latency, drift; the shadow's label
disagreements) and steps up, promotes, or aborts — the same audited events, carrying
the evidence.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from .models import _check_alias, get_version, promote
from .store import Home, NotFoundError, RegistryError, open_home

_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
    name TEXT NOT NULL,
    alias TEXT NOT NULL,
    canary INTEGER,                       -- version taking `weight` % of requests (NULL: none)
    weight REAL NOT NULL DEFAULT 0,
    sticky TEXT NOT NULL DEFAULT '',      -- '' | 'parameter' | 'input:NAME'
    shadow INTEGER,                       -- version receiving copies (NULL: none)
    shadow_sample REAL NOT NULL DEFAULT 0,
    policy TEXT NOT NULL DEFAULT '{}',    -- automatic analysis (see POLICY_DEFAULTS); {}: manual
    started_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (name, alias)
);
"""


# The automatic analysis' thresholds, when a policy names steps; each may be overridden.
POLICY_DEFAULTS: dict[str, Any] = {
    "steps": [],             # canary weights, increasing, ending at 100 (promotion)
    "min_requests": 200,     # canary answers needed at a step before judging it
    "step_seconds": 60.0,    # least time at each step
    "max_error_rate": 0.01,  # canary error rate may exceed the stable one by this much
    "max_p99_ratio": 1.5,    # canary p99 latency / stable p99 latency
    "max_disagreement": 0.05,  # share of shadow copies whose labels differ
    "fail_on_drift": True,   # abort when the canary's inputs or predictions drift
}


def check_policy(policy: dict[str, Any]) -> dict[str, Any]:
    """A complete policy from overrides ({} stays {}: a manual rollout)."""
    if not policy:
        return {}
    unknown = set(policy) - set(POLICY_DEFAULTS)
    if unknown:
        raise RegistryError(f"unknown rollout policy keys {sorted(unknown)}; known: {sorted(POLICY_DEFAULTS)}")
    full = {**POLICY_DEFAULTS, **policy}
    steps = full["steps"]
    if (not steps or any(not 0 < w <= 100 for w in steps) or list(steps) != sorted(set(steps))
            or steps[-1] != 100):
        raise RegistryError(f"automatic steps must be increasing weights in (0, 100] ending at 100 "
                            f"(e.g. 10,50,100), got {steps}")
    for key in ("min_requests", "step_seconds", "max_error_rate", "max_p99_ratio", "max_disagreement"):
        if not isinstance(full[key], (int, float)) or full[key] < 0:
            raise RegistryError(f"rollout policy {key} must be a non-negative number, got {full[key]!r}")
    full["steps"] = [float(w) for w in steps]
    return full


@dataclass(frozen=True)
class Rollout:
    name: str
    alias: str
    stable: int                # the version the alias names
    canary: int | None
    weight: float              # percent of the alias's requests the canary answers
    sticky: str                # where a request's routing key is: '' (none), 'parameter', 'input:NAME'
    shadow: int | None
    shadow_sample: float       # share of requests copied to the shadow version
    started_at: float
    updated_at: float
    policy: dict[str, Any] = field(default_factory=dict)  # automatic analysis; {}: manual

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.alias}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _ensure_table(home: Home) -> None:
    # Homes made before rollouts existed get the table on first use.
    if not home.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'rollouts'").fetchone():
        home.db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")


def parse_alias_ref(ref: str) -> tuple[str, str]:
    """'name@alias' -> (name, alias): a rollout is on an alias, so one must be named."""
    name, _, alias = ref.partition("@")
    if not name or not alias:
        raise RegistryError(f"a rollout is on an alias: name it as NAME@ALIAS (e.g. churn@production), got {ref!r}")
    return name, _check_alias(alias)


def check_sticky(sticky: str) -> str:
    if sticky not in ("", "parameter") and not (sticky.startswith("input:") and len(sticky) > 6):
        raise RegistryError(f"sticky must be 'parameter' (the request parameter routing_key) or 'input:NAME' "
                            f"(the first value of that input), got {sticky!r}")
    return sticky


def _row(home: Home, name: str, alias: str) -> Rollout | None:
    row = home.db.execute("SELECT * FROM rollouts WHERE name = ? AND alias = ?", (name, alias)).fetchone()
    if row is None:
        return None
    stable = get_version(home, f"{name}@{alias}").version
    return Rollout(row["name"], row["alias"], stable, row["canary"], row["weight"], row["sticky"], row["shadow"],
                   row["shadow_sample"], row["started_at"], row["updated_at"], json.loads(row["policy"]))


def get_rollout(home: Home | str | os.PathLike | None, ref: str) -> Rollout | None:
    """The active rollout on NAME@ALIAS, or None."""
    home = open_home(home)
    _ensure_table(home)
    name, alias = parse_alias_ref(ref)
    return _row(home, name, alias)


def list_rollouts(home: Home | str | os.PathLike | None) -> list[Rollout]:
    home = open_home(home)
    _ensure_table(home)
    keys = home.db.execute("SELECT name, alias FROM rollouts ORDER BY name, alias").fetchall()
    return [r for name, alias in keys if (r := _row(home, name, alias)) is not None]


def _check_weight(weight: float) -> float:
    if not 0 <= weight <= 100:
        raise RegistryError(f"weight is a percentage of requests, 0 to 100; got {weight:g}")
    return float(weight)


def start_rollout(
    home: Home | str | os.PathLike | None, ref: str, canary: int | None = None, weight: float = 10.0,
    sticky: str = "", shadow: int | None = None, shadow_sample: float = 0.1, reason: str = "",
    policy: dict[str, Any] | None = None,
) -> Rollout:
    """Start a rollout on NAME@ALIAS: a canary version at `weight` percent, a shadow version
    copied `shadow_sample` of requests, or both. A `policy` with steps (POLICY_DEFAULTS)
    hands the steps to the servers' automatic analysis, starting at the first step."""
    home = open_home(home)
    _ensure_table(home)
    name, alias = parse_alias_ref(ref)
    if canary is None and shadow is None:
        raise RegistryError("a rollout needs a canary version (--canary), a shadow version (--shadow), or both")
    check_sticky(sticky)
    policy = check_policy(policy or {})
    if policy:
        if canary is None:
            raise RegistryError("automatic steps need a canary version (--canary)")
        weight = policy["steps"][0]
    _check_weight(weight)
    if not 0 < shadow_sample <= 1:
        raise RegistryError(f"shadow sample is a share of requests in (0, 1], got {shadow_sample:g}")
    with home.transaction():
        stable = get_version(home, ref).version  # NotFoundError for an unknown alias
        for role, version in (("canary", canary), ("shadow", shadow)):
            if version is None:
                continue
            get_version(home, f"{name}/{version}")
            if version == stable:
                raise RegistryError(f"{ref} already is version {version}: the {role} must be another version")
        if _row(home, name, alias) is not None:
            raise RegistryError(f"{ref} already has a rollout: promote or abort it first (vivace rollout status {ref})")
        now = time.time()
        home.db.execute(
            "INSERT INTO rollouts (name, alias, canary, weight, sticky, shadow, shadow_sample, policy, started_at,"
            " updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, alias, canary, weight if canary is not None else 0.0, sticky, shadow,
             shadow_sample if shadow is not None else 0.0, json.dumps(policy), now, now))
        rollout = _row(home, name, alias)
        assert rollout is not None
        home.audit("rollout.start", ref, reason, rollout.to_json())
    return rollout


def _active(home: Home, ref: str) -> Rollout:
    name, alias = parse_alias_ref(ref)
    rollout = _row(home, name, alias)
    if rollout is None:
        raise NotFoundError(f"{ref} has no rollout (start one with vivace rollout start {ref} --canary VERSION)")
    return rollout


def step_rollout(home: Home | str | os.PathLike | None, ref: str, weight: float, reason: str = "",
                 evidence: dict[str, Any] | None = None) -> Rollout:
    """Give the canary `weight` percent of the requests (a step up, or down)."""
    home = open_home(home)
    _ensure_table(home)
    _check_weight(weight)
    with home.transaction():
        rollout = _active(home, ref)
        if rollout.canary is None:
            raise RegistryError(f"the rollout on {ref} has no canary to weigh (shadow only)")
        home.db.execute("UPDATE rollouts SET weight = ?, updated_at = ? WHERE name = ? AND alias = ?",
                        (weight, time.time(), rollout.name, rollout.alias))
        home.audit("rollout.step", ref, reason, {"canary": rollout.canary, "weight": weight,
                                                 "previous": rollout.weight, "evidence": evidence or {}})
        stepped = _row(home, rollout.name, rollout.alias)
    assert stepped is not None
    return stepped


def promote_rollout(home: Home | str | os.PathLike | None, ref: str, reason: str = "", force: bool = False,
                    metric: str = "auc", evidence: dict[str, Any] | None = None) -> tuple[list, int | None]:
    """Move the alias to the canary through the promotion gate and end the rollout;
    returns the gate's (checks, previous version). A refused gate leaves the rollout on."""
    home = open_home(home)
    _ensure_table(home)
    rollout = _active(home, ref)
    if rollout.canary is None:
        raise RegistryError(f"the rollout on {ref} has no canary to promote (shadow only): abort it instead")
    checks, previous = promote(home, rollout.name, rollout.canary, rollout.alias, metric=metric, force=force,
                               reason=reason)
    with home.transaction():
        _end(home, rollout, "rollout.promote", reason, evidence)
    return checks, previous


def abort_rollout(home: Home | str | os.PathLike | None, ref: str, reason: str = "",
                  evidence: dict[str, Any] | None = None) -> Rollout:
    """End the rollout: every request goes to the alias's version again."""
    home = open_home(home)
    _ensure_table(home)
    with home.transaction():
        rollout = _active(home, ref)
        _end(home, rollout, "rollout.abort", reason, evidence)
    return rollout


def _end(home: Home, rollout: Rollout, action: str, reason: str, evidence: dict[str, Any] | None) -> None:
    """Delete the rollout and audit why (inside the caller's transaction)."""
    home.db.execute("DELETE FROM rollouts WHERE name = ? AND alias = ?", (rollout.name, rollout.alias))
    home.audit(action, rollout.ref, reason, {**rollout.to_json(), "evidence": evidence or {}})


def end_if_promoted(home: Home, name: str, alias: str, version: int, evidence: dict[str, Any]) -> None:
    """An approved promotion moved NAME@ALIAS to `version`: a rollout whose canary that was
    is over (promoted)."""
    _ensure_table(home)
    with home.transaction():
        rollout = _row(home, name, alias)
        if rollout is None or rollout.canary != version:
            return
        _end(home, rollout, "rollout.promote", "approved promotion", evidence)
