"""Model registry: immutable versions, aliases, promotion gates, model cards.

Concepts as MLflow users know them: a registered model `name` has versions 1, 2, ...;
each version points at a model package stored content-addressed under
``<home>/packages/<sha256 of package.json>``. Aliases (``name@production``) point at a
version and move; ``name/3`` names a version; ``name@latest`` the newest one.

References accepted by `resolve`: ``name@alias``, ``name@latest``, ``name/3``, ``name``.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .data import check_name
from .package import MANIFEST, PackageError, load_package
from .store import Home, IntegrityError, NotFoundError, RegistryError, open_home

# Metrics where lower is better; any other gate metric defaults to "higher is better".
LOWER_IS_BETTER = {"logloss", "rmse", "mse", "mae", "loss", "error"}


class PromotionRefused(RegistryError):
    """The quality gate failed; `checks` holds each (check, passed, detail)."""

    def __init__(self, message: str, checks: list[tuple[str, bool, str]]):
        self.checks = checks
        super().__init__(message)


class ProtectedAlias(RegistryError):
    """The alias is protected: moving it needs an approved promotion request (or --force)."""


def is_protected(home: Home, name: str, alias: str) -> bool:
    """Whether moving `name@alias` needs a second identity's approval (registry/approvals.py)."""
    if not home.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'protected_aliases'").fetchone():
        return False
    return home.db.execute("SELECT 1 FROM protected_aliases WHERE name = ? AND alias = ?",
                           (name, alias)).fetchone() is not None


def _guard(home: Home, name: str, alias: str, force: bool, reason: str, approved: bool) -> None:
    if approved or not is_protected(home, name, alias):
        return
    if not force:
        raise ProtectedAlias(f"{name}@{alias} is protected: request the promotion (vivace models request "
                             f"{name} VERSION --alias {alias}) and have another identity approve it, or use "
                             "--force --reason TEXT in an emergency (audited)")
    if not reason.strip():
        raise RegistryError(f"--force on the protected alias {name}@{alias} needs --reason (it is audited)")


@dataclass
class ModelVersion:
    name: str
    version: int
    package_sha: str
    run_id: str | None
    description: str
    tags: dict[str, str]
    metrics: dict[str, float]
    behavioural: list[dict[str, Any]]
    lineage: dict[str, Any]
    created_at: float
    aliases: list[str] = field(default_factory=list)

    @property
    def ref(self) -> str:
        return f"{self.name}/{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "package_sha": self.package_sha,
            "run_id": self.run_id, "description": self.description, "tags": self.tags,
            "metrics": self.metrics, "behavioural": self.behavioural, "lineage": self.lineage,
            "created_at": self.created_at, "aliases": self.aliases,
        }


def parse_model_ref(ref: str) -> tuple[str, str | None, int | None]:
    """'name@alias' -> (name, alias, None); 'name/3' -> (name, None, 3); 'name' -> latest."""
    if "@" in ref:
        name, _, alias = ref.partition("@")
        if not alias:
            raise RegistryError(f"invalid model reference {ref!r}: empty alias after '@'")
        if alias.isdigit():
            return name, None, int(alias)
        return name, (None if alias == "latest" else alias), None
    if "/" in ref:
        name, _, version = ref.partition("/")
        if not version.isdigit():
            raise RegistryError(f"invalid model reference {ref!r}: the version after '/' must be a number")
        return name, None, int(version)
    return ref, None, None


def _version_from_row(home: Home, row: Any) -> ModelVersion:
    aliases = [r[0] for r in home.db.execute(
        "SELECT alias FROM aliases WHERE name = ? AND version = ? ORDER BY alias", (row["name"], row["version"])
    )]
    return ModelVersion(
        name=row["name"], version=row["version"], package_sha=row["package_sha"], run_id=row["run_id"],
        description=row["description"], tags=json.loads(row["tags"]), metrics=json.loads(row["metrics"]),
        behavioural=json.loads(row["behavioural"]), lineage=json.loads(row["lineage"]),
        created_at=row["created_at"], aliases=aliases,
    )


def get_version(home: Home | str | os.PathLike | None, ref: str) -> ModelVersion:
    """The version a reference names; NotFoundError for unknown names, versions or aliases."""
    home = open_home(home)
    name, alias, version = parse_model_ref(ref)
    if not home.db.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone():
        raise NotFoundError(f"unknown model {name!r}")
    if alias is not None:
        hit = home.db.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
        if hit is None:
            known = [r[0] for r in home.db.execute("SELECT alias FROM aliases WHERE name = ? ORDER BY alias", (name,))]
            raise NotFoundError(f"model {name!r} has no alias {alias!r} (aliases: {', '.join(known) or 'none'})")
        version = hit[0]
    if version is None:
        row = home.db.execute(
            "SELECT * FROM model_versions WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
        ).fetchone()
    else:
        row = home.db.execute(
            "SELECT * FROM model_versions WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
    if row is None:
        raise NotFoundError(f"model {name!r} has no version {version}")
    return _version_from_row(home, row)


def package_path(home: Home, package_sha: str, verify: bool = True) -> Path:
    """The stored package directory; with verify, its manifest and every file are hash-checked."""
    path = home.packages / package_sha
    manifest = path / MANIFEST
    if not manifest.is_file():
        raise IntegrityError(f"package {package_sha[:12]}… is missing from {home.packages}")
    if verify:
        actual = hashlib.sha256(manifest.read_bytes()).hexdigest()
        if actual != package_sha:
            raise IntegrityError(f"{manifest} is corrupted (sha256 {actual[:12]}…, expected {package_sha[:12]}…)")
        try:
            load_package(path, verify=True)
        except PackageError as exc:
            raise IntegrityError(f"stored package refused: {exc}") from None
    return path


def resolve(home: Home | str | os.PathLike | None, ref: str, verify: bool = True) -> Path:
    """The package directory for ``name@alias`` / ``name/3`` / ``name@latest``.

    The serving engine calls this to find what to load. With `verify` (the default) the
    package's bytes are checked against their SHA-256 first and corruption is refused.
    """
    home = open_home(home)
    return package_path(home, get_version(home, ref).package_sha, verify=verify)


def _store_package(home: Home, source: Path) -> str:
    """Copy a verified package into packages/<sha of package.json>; returns that sha."""
    package = load_package(source, verify=True)
    manifest_bytes = (source / MANIFEST).read_bytes()
    package_sha = hashlib.sha256(manifest_bytes).hexdigest()
    final = home.packages / package_sha
    if (final / MANIFEST).is_file():
        return package_sha  # same content already stored: no copy
    staging = home.staging_dir("pkg.")
    try:
        (staging / MANIFEST).write_bytes(manifest_bytes)
        for name in package.files:
            shutil.copyfile(source / name, staging / name)
        for f in staging.iterdir():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        # Check the copy, not the source: the source may change while we copy it.
        try:
            load_package(staging, verify=True)
        except PackageError as exc:
            raise RegistryError(f"{source} changed while it was being registered: {exc}") from None
        for f in staging.iterdir():
            os.chmod(f, 0o444)
        os.chmod(staging, 0o755)  # mkdtemp made it private; a server may run as another user
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / MANIFEST).is_file():  # lost a race to an identical copy otherwise
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return package_sha


def register_model(
    home: Home | str | os.PathLike | None,
    package_dir: str | os.PathLike,
    name: str,
    run_id: str | None = None,
    description: str = "",
    tags: dict[str, str] | None = None,
    metrics: dict[str, float] | None = None,
) -> ModelVersion:
    """Register a package as the next version of `name` (created on first use).

    With `run_id`, the run's final metrics, behavioural test results and lineage (datasets,
    code commit, weights hash) are attached to the version.
    """
    home = open_home(home)
    check_name(name, "model name")
    home.collect_garbage()
    package_dir = Path(package_dir)
    run = None
    if run_id is not None:
        from .runs import get_run

        run = get_run(home, run_id)
        if run.status != "finished":
            raise RegistryError(f"run {run_id} is {run.status}; only a finished run can back a model version")
    try:
        package_sha = _store_package(home, package_dir)
    except PackageError as exc:
        raise RegistryError(f"cannot register {package_dir}: {exc}") from None
    lineage: dict[str, Any] = {"package_sha256": package_sha, "source": str(package_dir.absolute())}
    version_metrics: dict[str, float] = {}
    behavioural: list[dict[str, Any]] = []
    if run is not None:
        version_metrics.update(run.metrics)
        behavioural = run.behavioural
        run_id = run.id  # a prefix given by the user becomes the full id
        lineage.update(
            run=run.id, datasets=run.datasets, weights_sha256=run.weights_hash,
            code_commit=run.environment.get("git_commit"),
            feature_views=run.feature_views,
        )
    version_metrics.update(metrics or {})
    now = time.time()
    with home.transaction() as db:
        db.execute("INSERT OR IGNORE INTO models (name, created_at) VALUES (?, ?)", (name, now))
        version = db.execute(
            "SELECT COALESCE(MAX(version), 0) + 1 FROM model_versions WHERE name = ?", (name,)
        ).fetchone()[0]
        db.execute(
            "INSERT INTO model_versions (name, version, package_sha, run_id, description, tags, metrics,"
            " behavioural, lineage, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, version, package_sha, run_id, description, json.dumps(tags or {}),
             json.dumps(version_metrics), json.dumps(behavioural), json.dumps(lineage), now),
        )
        home.audit("model.register", f"{name}/{version}", details={"package_sha256": package_sha, "run": run_id})
    return get_version(home, f"{name}/{version}")


def _check_alias(alias: str) -> str:
    check_name(alias, "alias")
    if alias == "latest" or alias.isdigit():
        raise RegistryError(f"alias {alias!r} is reserved (latest and numbers name versions)")
    return alias


def set_alias(
    home: Home | str | os.PathLike | None, name: str, version: int, alias: str, reason: str = "",
    force: bool = False,
) -> int | None:
    """Point `name@alias` at `version`; returns the version it pointed at before (or None).
    A protected alias moves only with `force` and a reason (audited as an override)."""
    home = open_home(home)
    _check_alias(alias)
    with home.transaction():
        _guard(home, name, alias, force, reason, approved=False)
        previous = _move_alias(home, name, version, alias)
        home.audit("model.alias.override" if force and is_protected(home, name, alias) else "model.alias",
                   f"{name}/{version}", reason, {"alias": alias, "previous": previous})
    return previous


def _move_alias(home: Home, name: str, version: int, alias: str) -> int | None:
    get_version(home, f"{name}/{version}")  # NotFoundError for unknown name or version
    row = home.db.execute("SELECT version FROM aliases WHERE name = ? AND alias = ?", (name, alias)).fetchone()
    home.db.execute(
        "INSERT INTO aliases (name, alias, version, updated_at) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version, updated_at = excluded.updated_at",
        (name, alias, version, time.time()),
    )
    return row[0] if row else None


def delete_alias(home: Home | str | os.PathLike | None, name: str, alias: str, reason: str = "",
                 force: bool = False) -> int:
    """Remove `name@alias`; returns the version it pointed at (a protected alias: `force`)."""
    home = open_home(home)
    with home.transaction() as db:
        _guard(home, name, alias, force, reason, approved=False)
        version = get_version(home, f"{name}@{alias}").version
        db.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
        home.audit("model.alias.delete", f"{name}/{version}", reason, {"alias": alias})
    return version


def update_version(
    home: Home | str | os.PathLike | None, ref: str, description: str | None = None,
    tags: dict[str, str] | None = None, remove_tags: list[str] | None = None,
) -> ModelVersion:
    """Change a version's description or tags (its package stays immutable)."""
    home = open_home(home)
    with home.transaction() as db:
        mv = get_version(home, ref)
        new_tags = {k: v for k, v in {**mv.tags, **(tags or {})}.items() if k not in (remove_tags or [])}
        db.execute(
            "UPDATE model_versions SET description = ?, tags = ? WHERE name = ? AND version = ?",
            (mv.description if description is None else description, json.dumps(new_tags), mv.name, mv.version),
        )
        home.audit("model.update", mv.ref, details={"description": description, "tags": tags or {},
                                                    "removed_tags": remove_tags or []})
    return get_version(home, ref)


def list_models(home: Home | str | os.PathLike | None) -> list[dict[str, Any]]:
    """One summary per registered model: latest version, version count, aliases."""
    home = open_home(home)
    out = []
    for row in home.db.execute(
        "SELECT m.name, m.description, COUNT(v.version) AS versions, MAX(v.version) AS latest"
        " FROM models m JOIN model_versions v ON v.name = m.name GROUP BY m.name ORDER BY m.name"
    ).fetchall():
        aliases = {r["alias"]: r["version"] for r in home.db.execute(
            "SELECT alias, version FROM aliases WHERE name = ? ORDER BY alias", (row["name"],))}
        out.append({"name": row["name"], "description": row["description"], "versions": row["versions"],
                    "latest": row["latest"], "aliases": aliases})
    return out


def list_versions(home: Home | str | os.PathLike | None, name: str) -> list[ModelVersion]:
    home = open_home(home)
    rows = home.db.execute("SELECT * FROM model_versions WHERE name = ? ORDER BY version", (name,)).fetchall()
    if not rows:
        raise NotFoundError(f"unknown model {name!r}")
    return [_version_from_row(home, r) for r in rows]


# ---- promotion -----------------------------------------------------------------------


GROUP_DIFFERENCES = ("demographic_parity_difference", "equal_opportunity_difference", "mae_difference")


def group_differences(fairness: dict[str, Any] | None) -> dict[str, tuple[str, float]]:
    """{attribute: (metric, value)}: the largest group difference of each sensitive attribute
    that `vivace train` recorded (package metadata.fairness)."""
    out: dict[str, tuple[str, float]] = {}
    for attribute, stats in (fairness or {}).items():
        found = [(stats[k], k) for k in GROUP_DIFFERENCES if isinstance(stats.get(k), (int, float))]
        if found:
            value, metric = max(found)
            out[attribute] = (metric, float(value))
    return out


def gate_checks(
    candidate: ModelVersion, holder: ModelVersion | None, metric: str, direction: str, margin: float,
    fairness: dict[str, Any] | None = None, max_group_difference: float | None = None,
) -> list[tuple[str, bool, str]]:
    """The quality gate: (check, passed, detail) for the metric comparison and behavioural tests,
    and with `max_group_difference` the bias check: every sensitive attribute's demographic
    parity and equal opportunity differences (`fairness`, the candidate's training group
    metrics) at most that.

    The candidate passes the metric check when it is at least `margin` better than the
    current holder (`margin` may be negative to tolerate a small regression).
    """
    checks: list[tuple[str, bool, str]] = []
    value = candidate.metrics.get(metric)
    if value is None:
        checks.append((f"metric {metric}", False, f"{candidate.ref} has no {metric!r} metric recorded"))
    elif holder is None or holder.version == candidate.version:
        checks.append((f"metric {metric}", True, f"{value:.6g} (no other current holder to beat)"))
    elif metric not in holder.metrics:
        checks.append((f"metric {metric}", True, f"{value:.6g}; holder {holder.ref} has no {metric!r}"))
    else:
        reference = holder.metrics[metric]
        if direction == "max":
            ok, needed = value >= reference + margin, f">= {reference + margin:.6g}"
        else:
            ok, needed = value <= reference - margin, f"<= {reference - margin:.6g}"
        checks.append((f"metric {metric}", ok,
                       f"{value:.6g} vs holder {holder.ref} {reference:.6g} (needs {needed}, direction {direction})"))
    if max_group_difference is not None:
        differences = group_differences(fairness)
        if not differences:
            checks.append(("group metrics", False, f"{candidate.ref} records no group metrics (train it with "
                                                   "`sensitive: [column, ...]` in its config)"))
        else:
            worst = {a: d for a, d in differences.items() if d[1] > max_group_difference}
            detail = "; ".join(f"{a}: {m} {v:.4g}" for a, (m, v) in sorted(differences.items()))
            checks.append(("group metrics", not worst, f"{detail} (max allowed {max_group_difference:g})"))
    failed = [t["name"] for t in candidate.behavioural if not t.get("passed")]
    if failed:
        checks.append(("behavioural tests", False, f"failed: {', '.join(failed)}"))
    else:
        checks.append(("behavioural tests", True,
                       f"{len(candidate.behavioural)} passed" if candidate.behavioural else "none declared"))
    return checks


def promote(
    home: Home | str | os.PathLike | None, name: str, version: int, alias: str = "production",
    metric: str = "auc", direction: str | None = None, margin: float = 0.0,
    force: bool = False, reason: str = "", approved: bool = False, max_group_difference: float | None = None,
) -> tuple[list[tuple[str, bool, str]], int | None]:
    """Move `name@alias` to `version` if it passes the quality gate; returns (checks, previous).

    The gate is evaluated and the alias moved inside one write transaction, so the
    holder cannot change in between. `force` requires a reason and is audited as an override.
    A protected alias also needs `approved` (an approved request, registry/approvals.py) or
    `force`; ProtectedAlias otherwise. `max_group_difference`: also refuse a candidate whose
    training group metrics differ more than this between the groups of a sensitive attribute.
    """
    home = open_home(home)
    _check_alias(alias)
    direction = direction or ("min" if metric in LOWER_IS_BETTER else "max")
    if direction not in ("max", "min"):
        raise RegistryError(f"direction must be 'max' or 'min', got {direction!r}")
    if force and not reason.strip():
        raise RegistryError("--force needs --reason: overrides are recorded in the audit log")
    with home.transaction():
        _guard(home, name, alias, force, reason, approved)
        candidate = get_version(home, f"{name}/{version}")
        try:
            holder: ModelVersion | None = get_version(home, f"{name}@{alias}")
        except NotFoundError:
            holder = None
        fairness = None
        if max_group_difference is not None:
            fairness = load_package(package_path(home, candidate.package_sha, verify=False),
                                    verify=False).metadata.get("fairness")
        checks = gate_checks(candidate, holder, metric, direction, margin, fairness, max_group_difference)
        passed = all(ok for _, ok, _ in checks)
        bypassed = force and not approved and is_protected(home, name, alias)
        details = {"alias": alias, "metric": metric, "direction": direction, "margin": margin,
                   "max_group_difference": max_group_difference,
                   "previous": holder.version if holder else None, "approved": approved,
                   "protection_overridden": bypassed,
                   "checks": [{"check": c, "passed": ok, "detail": d} for c, ok, d in checks]}
        if not passed and not force:
            # A refused promotion is recorded too: it happens in this transaction, which
            # commits (the alias is untouched) before the refusal is raised.
            home.audit("model.promote.refused", candidate.ref, reason, details)
        else:
            _move_alias(home, name, version, alias)
            home.audit("model.promote.override" if not passed or bypassed else "model.promote", candidate.ref,
                       reason, details)
    if not passed and not force:
        report = "\n".join(f"  [{'pass' if ok else 'FAIL'}] {c}: {d}" for c, ok, d in checks)
        raise PromotionRefused(f"promotion of {name}/{version} to @{alias} refused:\n{report}", checks)
    return checks, holder.version if holder else None


# ---- model card ----------------------------------------------------------------------


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _num(v: Any) -> str:
    return "&ndash;" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))


RISK_DIFFERENCE = 0.1  # a group difference above this is flagged in the card's risk assessment


def _risks(mv: ModelVersion, config: dict[str, Any], metadata: dict[str, Any]) -> list[str]:
    """What a reviewer should weigh before promoting: read off what the registry recorded."""
    risks = []
    if not (mv.description or config.get("intended_use")):
        risks.append("**Intended use not stated**: misuse cannot be ruled out; describe it.")
    sensitive = metadata.get("sensitive") or []
    if not sensitive:
        risks.append("**No sensitive attributes declared**: group fairness was not measured.")
    for attribute, (metric, value) in sorted(group_differences(metadata.get("fairness")).items()):
        level = "**High**" if value > RISK_DIFFERENCE else "Low"
        risks.append(f"{level}: {metric.replace('_', ' ')} across `{attribute}` groups is {value:.3g} "
                     f"(flagged above {RISK_DIFFERENCE:g}; gate with `vivace models promote --max-group-difference`).")
    importance = (metadata.get("importance") or {}).get("features") or {}
    total = sum(v for v in importance.values() if v and v > 0) or 0.0
    for attribute in sensitive:
        share = (importance.get(attribute) or 0.0) / total if total else 0.0
        if attribute in importance and share > 0.05:
            risks.append(f"**The model relies on the sensitive attribute `{attribute}`** ({share:.0%} of the total "
                         "permutation importance).")
    failed = [t["name"] for t in mv.behavioural if not t.get("passed")]
    if failed:
        risks.append(f"**Behavioural tests failed**: {', '.join(failed)}.")
    if not metadata.get("profile"):
        risks.append("No training profile: drift cannot be monitored in production.")
    risks.append("Production quality depends on labels: serve with --prediction-log and POST ground truth to "
                 "/v2/models/NAME/feedback to watch accuracy, calibration and group metrics online.")
    return risks


def model_card(home: Home | str | os.PathLike | None, ref: str) -> str:
    """A markdown model card for one version, built from its registry metadata."""
    home = open_home(home)
    mv = get_version(home, ref)
    package = load_package(package_path(home, mv.package_sha, verify=False), verify=False)
    run = None
    if mv.run_id:
        from .runs import get_run

        run = get_run(home, mv.run_id)
    config = run.config if run else {}
    lines = [f"# Model card: {mv.name} version {mv.version}", ""]
    if mv.aliases:
        lines += [f"Aliases: {', '.join('@' + a for a in mv.aliases)}", ""]
    lines += ["## Intended use", "",
              mv.description or config.get("intended_use") or
              "Not stated. Describe it with `vivace models describe NAME/VERSION TEXT`.", ""]
    lines += ["## Model", "", f"- platform: {package.platform}, file `{package.model_file}`",
              "- inputs: " + ", ".join(f"`{t.name}` {t.datatype} {list(t.shape)}" for t in package.inputs),
              "- outputs: " + ", ".join(f"`{t.name}` {t.datatype} {list(t.shape)}" for t in package.outputs)]
    features = package.metadata.get("features")
    if features:
        lines.append("- features (input column order): " + ", ".join(f["name"] for f in features))
    if config.get("model"):
        lines.append(f"- architecture: {json.dumps(config['model'], sort_keys=True)}")
    lines.append("")
    if features:
        lines += ["## Features", "",
                  "Send them as the columns of the one input, in this order, or by name (numbers; strings "
                  "for a categorical feature, coded as below, -1 when unseen).", "",
                  "| # | feature | kind | codes |", "| --- | --- | --- | --- |"]
        lines += [f"| {j} | {_cell(f['name'])} | {f['kind']} | "
                  + _cell(", ".join(f"{k}={c}" for k, c in enumerate(f.get("categories") or []))) + " |"
                  for j, f in enumerate(features)]
        lines.append("")
    lines += ["## Data", ""]
    datasets = mv.lineage.get("datasets") or []
    if datasets:
        lines += [f"- trained on `{d}`" for d in datasets]
        if mv.lineage.get("feature_views"):
            lines.append("- with features from the feature views "
                         + ", ".join(f"`{v}`" for v in mv.lineage["feature_views"]) + " (point-in-time join)")
        if config.get("target"):
            lines.append(f"- target column: `{config['target']}`")
    else:
        lines.append("No training data recorded (registered without a run).")
    lines += ["", "## Metrics", ""]
    if mv.metrics:
        lines += ["| metric | value |", "| --- | --- |"] + [f"| {k} | {v:.6g} |" for k, v in sorted(mv.metrics.items())]
    else:
        lines.append("No metrics recorded.")
    importance = package.metadata.get("importance")
    if importance and importance.get("features"):
        lines += ["", "## Feature importance (training)", "",
                  f"Permutation importance on {importance.get('rows')} validation rows, {importance.get('repeats')} "
                  f"repeats: the mean drop of {importance.get('metric')} when the feature's column is shuffled.", "",
                  "| feature | importance | std |", "| --- | --- | --- |"]
        std = importance.get("std") or {}
        lines += [f"| {_cell(k)} | {v:.4g} | {std.get(k, 0.0):.2g} |"
                  for k, v in sorted(importance["features"].items(), key=lambda kv: -(kv[1] or 0.0)) if v is not None]
    fairness = package.metadata.get("fairness") or {}
    lines += ["", "## Group metrics", ""]
    if fairness:
        for attribute, stats in sorted(fairness.items()):
            lines += [f"### {attribute}", ""]
            summary = [f"{k.replace('_', ' ')}: {stats[k]:.4g}" for k in (*GROUP_DIFFERENCES, "error_rate_difference")
                       if isinstance(stats.get(k), (int, float))]
            if summary:
                lines += ["- " + "; ".join(summary), ""]
            groups = stats.get("groups") or {}
            keys = [k for k in ("rows", "label_rate", "selection_rate", "tpr", "fpr", "error_rate", "mae")
                    if any(k in g for g in groups.values())]
            lines += ["| group | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
            lines += [f"| {_cell(g)} | " + " | ".join(_num(v.get(k)) for k in keys) + " |"
                      for g, v in sorted(groups.items())]
            lines.append("")
    else:
        lines += ["No sensitive attributes declared (`sensitive: [column, ...]` in the training config).", ""]
    lines += ["## Risk assessment", ""] + [f"- {r}" for r in _risks(mv, config, package.metadata)]
    lines += ["", "## Behavioural tests", ""]
    if mv.behavioural:
        lines += ["| test | kind | result | detail |", "| --- | --- | --- | --- |"]
        lines += [f"| {t['name']} | {t['type']} | {'pass' if t['passed'] else 'FAIL'} | {_cell(t['detail'])} |"
                  for t in mv.behavioural]
    else:
        lines.append("None declared.")
    lines += ["", "## Lineage", ""]
    lineage = {"run": mv.run_id, **mv.lineage}
    lines += [f"- {k}: `{', '.join(v) if isinstance(v, list) else v}`"
              for k, v in lineage.items() if v not in (None, [], {})]
    if mv.tags:
        lines += ["", "## Tags", ""] + [f"- {k}: {v}" for k, v in sorted(mv.tags.items())]
    return "\n".join(lines) + "\n"
