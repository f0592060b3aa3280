"""Data versioning: immutable, content-addressed, validated dataset versions.

``add_dataset(home, "churn", "data.parquet", schema="schema.yaml")`` snapshots a file or a
folder (parquet, csv, npy). The version is keyed by the hash of the content, not the
path: adding the same bytes again returns the existing version and copies nothing.
Data that breaks the declared schema is refused with a report of every failing column
and rule, and no version is created.

A schema file (YAML):

    columns:
      customer_id: {dtype: int, unique: true, nullable: false}
      tenure_months: {dtype: int, min: 0, max: 120}
      plan: {dtype: string, allowed: [basic, standard, premium]}
      monthly_charges: {dtype: float, min: 0}
    rows: {min: 100, max: 1000000}
    allow_extra_columns: true        # default true; false refuses undeclared columns

`dtype` is a kind (int, float, number, string, bool, datetime) or an exact dtype name
(int64, float32, ...). `nullable` defaults to true.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .store import Home, NotFoundError, RegistryError, open_home

if TYPE_CHECKING:
    import pandas as pd

FORMATS = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".npy": "npy"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_COLUMN_RULES = {"dtype", "nullable", "min", "max", "allowed", "unique"}
_DTYPE_KINDS = {"int", "integer", "float", "number", "numeric", "string", "str", "category", "bool", "datetime"}

log = logging.getLogger("vivace.registry")


class SchemaViolation(RegistryError):
    """Data failed validation; `violations` lists (column, rule, detail) for every failure."""

    def __init__(self, source: str, violations: list[tuple[str, str, str]]):
        self.violations = violations
        lines = [f"{source}: {len(violations)} schema violation(s), no version created:"]
        lines += [f"  column {col!r}: {rule}: {detail}" for col, rule, detail in violations]
        super().__init__("\n".join(lines))


@dataclass(frozen=True)
class DatasetVersion:
    name: str
    version: int
    content_hash: str
    files: dict[str, str]
    source: str
    size_bytes: int
    row_count: int
    schema: dict[str, Any] | None
    stats: dict[str, Any]
    parent: int | None
    created_at: float

    @property
    def ref(self) -> str:
        return f"{self.name}@v{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {
            "ref": self.ref, "name": self.name, "version": self.version,
            "content_hash": self.content_hash, "files": self.files, "source": self.source,
            "size_bytes": self.size_bytes, "row_count": self.row_count, "schema": self.schema,
            "stats": self.stats, "parent": self.parent, "created_at": self.created_at,
        }


def _row_to_version(row: Any) -> DatasetVersion:
    return DatasetVersion(
        name=row["name"], version=row["version"], content_hash=row["content_hash"],
        files=json.loads(row["files"]), source=row["source"], size_bytes=row["size_bytes"],
        row_count=row["row_count"], schema=json.loads(row["schema"]) if row["schema"] else None,
        stats=json.loads(row["stats"]), parent=row["parent"], created_at=row["created_at"],
    )


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise RegistryError(f"invalid {what} {name!r}: use letters, digits, '_', '.', '-' (max 128)")
    return name


# ---- reading -------------------------------------------------------------------------


def _read_file(path: Path, fmt: str) -> pd.DataFrame:
    import numpy as np
    import pandas as pd

    try:
        if fmt == "parquet":
            return pd.read_parquet(path)
        if fmt == "csv":
            return pd.read_csv(path)
        array = np.load(path, allow_pickle=False)
    except Exception as exc:  # each reader raises its own types; report them uniformly
        raise RegistryError(f"{path}: cannot read as {fmt}: {exc}") from None
    if array.dtype.names:
        return pd.DataFrame({n: array[n] for n in array.dtype.names})
    if array.ndim == 1:
        return pd.DataFrame({"value": array})
    if array.ndim == 2:
        return pd.DataFrame(array, columns=[f"c{i}" for i in range(array.shape[1])])
    raise RegistryError(f"{path}: npy arrays must be 1-D, 2-D or structured, got shape {array.shape}")


def _frame_from_files(files: list[tuple[str, Path]]) -> pd.DataFrame:
    """Concatenate the readable files of a snapshot (in path order) into one frame."""
    import pandas as pd

    frames = [_read_file(p, FORMATS[Path(rel).suffix.lower()]) for rel, p in files
              if Path(rel).suffix.lower() in FORMATS]
    if not frames:
        raise RegistryError("no parquet, csv or npy file in the dataset")
    return frames[0] if len(frames) == 1 else pd.concat(frames, ignore_index=True)


def _source_files(source: Path) -> list[tuple[str, Path]]:
    if source.is_file():
        if source.suffix.lower() not in FORMATS:
            raise RegistryError(f"{source}: unsupported format (use .parquet, .csv or .npy)")
        return [(source.name, source)]
    if source.is_dir():
        files = sorted(
            (p.relative_to(source).as_posix(), p) for p in source.rglob("*")
            if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
        )
        if not any(Path(rel).suffix.lower() in FORMATS for rel, _ in files):
            raise RegistryError(f"{source}: folder holds no .parquet, .csv or .npy file")
        return files
    raise RegistryError(f"{source}: no such file or folder")


# ---- schema --------------------------------------------------------------------------


def load_schema(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a schema YAML file; RegistryError names the first malformed entry."""
    import yaml

    path = Path(path)
    try:
        schema = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"schema file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise RegistryError(f"schema file {path}: invalid YAML: {exc}") from None
    return normalize_schema(schema, str(path))


def normalize_schema(schema: Any, where: str = "schema") -> dict[str, Any]:
    if not isinstance(schema, dict):
        raise RegistryError(f"{where}: must be a mapping with 'columns'")
    unknown = set(schema) - {"columns", "rows", "allow_extra_columns"}
    if unknown:
        raise RegistryError(f"{where}: unknown keys {sorted(unknown)}")
    columns = schema.get("columns") or {}
    if isinstance(columns, list):  # also accept [{name: x, dtype: ...}, ...]
        try:
            columns = {c["name"]: {k: v for k, v in c.items() if k != "name"} for c in columns}
        except (TypeError, KeyError):
            raise RegistryError(f"{where}: each column in a list needs a 'name'") from None
    if not isinstance(columns, dict):
        raise RegistryError(f"{where}: columns must be a mapping of column name to rules")
    for col, rules in columns.items():
        rules = columns[col] = rules or {}
        if not isinstance(rules, dict):
            raise RegistryError(f"{where}: column {col!r}: rules must be a mapping")
        bad = set(rules) - _COLUMN_RULES
        if bad:
            raise RegistryError(
                f"{where}: column {col!r}: unknown rule(s) {sorted(bad)}; known: {sorted(_COLUMN_RULES)}")
        dtype = rules.get("dtype")
        if dtype is not None and not isinstance(dtype, str):
            raise RegistryError(f"{where}: column {col!r}: dtype must be a string")
        if dtype is not None and dtype not in _DTYPE_KINDS:
            import numpy as np

            try:
                np.dtype(dtype)
            except TypeError:
                raise RegistryError(f"{where}: column {col!r}: unknown dtype {dtype!r}") from None
        for bound in ("min", "max"):
            if bound in rules and not isinstance(rules[bound], (int, float)):
                raise RegistryError(f"{where}: column {col!r}: {bound} must be a number")
        if "allowed" in rules and not isinstance(rules["allowed"], list):
            raise RegistryError(f"{where}: column {col!r}: allowed must be a list")
    rows = schema.get("rows") or {}
    if not isinstance(rows, dict) or set(rows) - {"min", "max"} or not all(
        isinstance(v, int) for v in rows.values()
    ):
        raise RegistryError(f"{where}: rows must be a mapping with integer 'min' and/or 'max'")
    return {"columns": columns, "rows": rows, "allow_extra_columns": bool(schema.get("allow_extra_columns", True))}


def _dtype_matches(series: pd.Series, dtype: str) -> bool:
    import pandas as pd
    from pandas.api import types as t

    def is_string(s: pd.Series) -> bool:
        return t.is_string_dtype(s) or isinstance(s.dtype, pd.CategoricalDtype)

    kind_checks = {
        "int": t.is_integer_dtype, "integer": t.is_integer_dtype, "float": t.is_float_dtype,
        "number": t.is_numeric_dtype, "numeric": t.is_numeric_dtype, "bool": t.is_bool_dtype,
        "datetime": t.is_datetime64_any_dtype, "string": is_string, "str": is_string, "category": is_string,
    }
    if dtype in kind_checks:
        return bool(kind_checks[dtype](series))
    return str(series.dtype) == dtype


def _odd_values(series: pd.Series) -> str:
    """For a dtype mismatch of a text column: the values that are not numbers, if most are."""
    import pandas as pd

    present = series.dropna().astype(str)
    odd = present[pd.to_numeric(present, errors="coerce").isna()]
    if odd.empty or len(odd) == len(present):
        return ""
    return f" ({len(odd)} value(s) that are not numbers, e.g. {odd.unique().tolist()[:5]}, in rows {odd.index.tolist()[:5]})"


def validate_frame(df: pd.DataFrame, schema: dict[str, Any]) -> list[tuple[str, str, str]]:
    """Every (column, rule, detail) the frame breaks; empty when it conforms."""
    import pandas as pd

    problems: list[tuple[str, str, str]] = []
    rows = schema.get("rows", {})
    if "min" in rows and len(df) < rows["min"]:
        problems.append(("<rows>", "rows.min", f"{len(df)} rows < minimum {rows['min']}"))
    if "max" in rows and len(df) > rows["max"]:
        problems.append(("<rows>", "rows.max", f"{len(df)} rows > maximum {rows['max']}"))
    columns = schema["columns"]
    if not schema.get("allow_extra_columns", True):
        for col in df.columns:
            if col not in columns:
                problems.append((str(col), "undeclared", "column is not in the schema"))
    for col, rules in columns.items():
        if col not in df.columns:
            problems.append((col, "missing", "column is absent"))
            continue
        series = df[col]
        if "dtype" in rules and not _dtype_matches(series, rules["dtype"]):
            problems.append((col, "dtype", f"expected {rules['dtype']}, got {series.dtype}{_odd_values(series)}"))
        nulls = int(series.isna().sum())
        if not rules.get("nullable", True) and nulls:
            rows_with_null = series.index[series.isna()].tolist()
            problems.append((col, "nullable", f"{nulls} null value(s) in a non-nullable column, in rows "
                             f"{rows_with_null[:5]}{' …' if nulls > 5 else ''}"))
        present = series.dropna()
        if "min" in rules or "max" in rules:
            numeric = pd.to_numeric(present, errors="coerce")
            if numeric.isna().any():
                problems.append((col, "min/max", "range declared on a non-numeric column"))
            else:
                if "min" in rules and len(numeric) and numeric.min() < rules["min"]:
                    n = int((numeric < rules["min"]).sum())
                    problems.append((col, "min", f"{n} value(s) below {rules['min']} (lowest {numeric.min()})"))
                if "max" in rules and len(numeric) and numeric.max() > rules["max"]:
                    n = int((numeric > rules["max"]).sum())
                    problems.append((col, "max", f"{n} value(s) above {rules['max']} (highest {numeric.max()})"))
        if "allowed" in rules:
            outside = sorted({str(v) for v in present.unique()} - {str(v) for v in rules["allowed"]})
            if outside:
                shown = ", ".join(outside[:5]) + (" …" if len(outside) > 5 else "")
                problems.append((col, "allowed", f"{len(outside)} value(s) not allowed: {shown}"))
        if rules.get("unique") and series.duplicated().any():
            repeated = series[series.duplicated()].unique().tolist()
            problems.append((col, "unique", f"{int(series.duplicated().sum())} duplicated value(s), e.g. "
                             f"{[str(v) for v in repeated[:5]]}"))
    return problems


def summary_stats(df: pd.DataFrame) -> dict[str, Any]:
    """Per-column summary: dtype and nulls; min/max/mean/std for numbers; top values otherwise."""
    from pandas.api import types as t

    stats: dict[str, Any] = {}
    for col in df.columns:
        s = df[col]
        entry: dict[str, Any] = {"dtype": str(s.dtype), "nulls": int(s.isna().sum())}
        if t.is_numeric_dtype(s) and not t.is_bool_dtype(s):
            present = s.dropna().astype("float64")
            if len(present):
                entry.update(min=float(present.min()), max=float(present.max()),
                             mean=float(present.mean()), std=float(present.std(ddof=0)))
        else:
            counts = s.astype("string").value_counts(dropna=True)
            entry.update(distinct=int(len(counts)), top={str(k): int(v) for k, v in counts.head(10).items()})
        stats[str(col)] = entry
    return stats


# Share of a text column's values that must parse as numbers for it to count as a numeric
# column spoiled by a few bad values (rather than a genuine categorical).
NUMERIC_LOOKALIKE_SHARE = 0.9


def numeric_lookalikes(frame: Any) -> dict[str, list[str]]:
    """Text columns whose values are nearly all numbers: {column: the values that are not}.

    Typically a numeric column with a stray "n/a" or "12,5": read as text, it would be
    one-hot encoded with one level per distinct number.
    """
    import pandas as pd
    from pandas.api import types as t

    found = {}
    for col in frame.columns:
        s = frame[col]
        if t.is_numeric_dtype(s) or t.is_bool_dtype(s):
            continue
        present = s.dropna().astype(str)
        if present.empty:
            continue
        parsed = pd.to_numeric(present, errors="coerce")
        if parsed.notna().mean() >= NUMERIC_LOOKALIKE_SHARE:
            found[str(col)] = present[parsed.isna()].unique().tolist()
    return found


# ---- versions ------------------------------------------------------------------------


def add_dataset(
    home: Home | str | os.PathLike | None,
    name: str,
    source: str | os.PathLike,
    schema: str | os.PathLike | dict[str, Any] | None = None,
) -> tuple[DatasetVersion, bool]:
    """Snapshot `source` as the next version of `name`; returns (version, created).

    The files are staged first (hashed while copied, so the snapshot is exactly what
    was hashed even if the source changes meanwhile) and validated from the staged copy;
    only valid data is published to the object store and recorded, in one transaction.
    """
    home = open_home(home)
    check_name(name, "dataset name")
    home.collect_garbage()
    source = Path(source)
    declared = load_schema(schema) if isinstance(schema, (str, os.PathLike)) else (
        normalize_schema(schema) if schema is not None else None
    )
    staged: dict[str, tuple[Path, str]] = {}
    size = 0
    try:
        for rel, path in _source_files(source):
            tmp, digest, n = home.stage_file(path)
            staged[rel] = (tmp, digest)
            size += n
        stored = {rel: digest for rel, (_, digest) in staged.items()}
        if len(stored) == 1:
            content_hash = next(iter(stored.values()))
        else:
            listing = json.dumps(sorted(stored.items()), separators=(",", ":")).encode()
            content_hash = hashlib.sha256(listing).hexdigest()
        existing = home.db.execute(
            "SELECT * FROM datasets WHERE name = ? AND content_hash = ? ORDER BY version LIMIT 1",
            (name, content_hash),
        ).fetchone()
        if existing:
            return _row_to_version(existing), False
        df = _frame_from_files([(rel, tmp) for rel, (tmp, _) in staged.items()])
        if declared is not None:
            problems = validate_frame(df, declared)
            if problems:
                raise SchemaViolation(str(source), problems)
        if declared is None:
            for col, bad in numeric_lookalikes(df).items():
                log.warning("%s: column %r is numeric but for %d value(s) that are not numbers, e.g. %s: it is "
                            "stored as text (declare it in a schema, or clean the values)",
                            source, col, len(bad), bad[:5])
        stats = summary_stats(df)
        for tmp, digest in staged.values():
            home.commit_object(tmp, digest)
    finally:
        for tmp, _ in staged.values():
            tmp.unlink(missing_ok=True)
    with home.transaction() as db:
        # Re-check inside the write lock: a concurrent add of the same bytes may have won.
        existing = db.execute(
            "SELECT * FROM datasets WHERE name = ? AND content_hash = ? ORDER BY version LIMIT 1",
            (name, content_hash),
        ).fetchone()
        if existing:
            return _row_to_version(existing), False
        parent = db.execute("SELECT MAX(version) FROM datasets WHERE name = ?", (name,)).fetchone()[0]
        version = (parent or 0) + 1
        db.execute(
            "INSERT INTO datasets VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (name, version, content_hash, json.dumps(stored), str(source.absolute()), size, len(df),
             json.dumps(declared) if declared else None, json.dumps(stats), parent, time.time()),
        )
        home.audit("data.add", f"{name}@v{version}", details={"content_hash": content_hash, "rows": len(df)})
    return get_dataset(home, f"{name}@v{version}"), True


def parse_dataset_ref(ref: str) -> tuple[str, str]:
    """'name@v3' / 'name@3' / 'name@latest' / 'name' -> (name, selector)."""
    name, _, selector = ref.partition("@")
    return name, selector or "latest"


def get_dataset(home: Home | str | os.PathLike | None, ref: str) -> DatasetVersion:
    """The version that `ref` names; NotFoundError for an unknown name or version."""
    home = open_home(home)
    name, selector = parse_dataset_ref(ref)
    if not home.db.execute("SELECT 1 FROM datasets WHERE name = ? LIMIT 1", (name,)).fetchone():
        raise NotFoundError(f"unknown dataset {name!r}")
    if selector == "latest":
        row = home.db.execute(
            "SELECT * FROM datasets WHERE name = ? ORDER BY version DESC LIMIT 1", (name,)
        ).fetchone()
    else:
        digits = selector[1:] if selector[:1] in ("v", "V") else selector
        if digits.isdigit():
            row = home.db.execute(
                "SELECT * FROM datasets WHERE name = ? AND version = ?", (name, int(digits))
            ).fetchone()
        elif len(selector) >= 6 and all(c in "0123456789abcdef" for c in selector):
            row = home.db.execute(  # a content-hash prefix, as `data show` prints it
                "SELECT * FROM datasets WHERE name = ? AND content_hash LIKE ? ORDER BY version LIMIT 1",
                (name, selector + "%"),
            ).fetchone()
        else:
            raise RegistryError(f"invalid dataset version {selector!r}: use vN, N, latest or a content-hash prefix")
    if row is None:
        raise NotFoundError(f"dataset {name!r} has no version {selector!r}")
    return _row_to_version(row)


def list_datasets(home: Home | str | os.PathLike | None, name: str | None = None) -> list[DatasetVersion]:
    """All versions (of one dataset when `name` is given), by name then version."""
    home = open_home(home)
    if name:
        rows = home.db.execute("SELECT * FROM datasets WHERE name = ? ORDER BY version", (name,)).fetchall()
        if not rows:
            raise NotFoundError(f"unknown dataset {name!r}")
    else:
        rows = home.db.execute("SELECT * FROM datasets ORDER BY name, version").fetchall()
    return [_row_to_version(r) for r in rows]


def open_dataset(ref: str, home: Home | str | os.PathLike | None = None) -> pd.DataFrame:
    """Load a dataset version as a pandas DataFrame: ``open_dataset("churn@v3")``.

    Every stored file is verified against its SHA-256 before it is read.
    """
    home = open_home(home)
    version = get_dataset(home, ref)
    return _frame_from_files([(rel, home.verify_object(d)) for rel, d in version.files.items()])
