"""Pipelines as code: the pipeline file format (`vivace-pipeline/1`), its DAG, the step cache
and the runner behind `vivace pipeline run|status|ci`.

A pipeline file is YAML: a name, typed parameters, and steps. Each step has a `name`, a
`type` and that type's fields; `needs` orders it after other steps, and so does any
reference to another step's output::

    name: churn
    params:
      train: {epochs: 12}
    steps:
      - name: validate
        type: data.validate
        dataset: churn
        source: data/churn.parquet
        schema: churn_schema.yaml
      - name: train
        type: train
        config: churn_train.yaml
        dataset: ${steps.validate.outputs.ref}
        set: {train.epochs: "${params.train.epochs}"}

References: ``${params.a.b}``, ``${steps.NAME.outputs.KEY}``, and ``${python}`` (this
interpreter), ``${home}`` (the Vivace home), ``${workdir}``, ``${vivace_data}`` (the bundled
data folder); ``$${`` is a literal ``${``. A value that is exactly one reference keeps the
referenced type; inside a `shell` step's `run`, substituted values are shell-quoted.
Relative paths are relative to the workdir: the pipeline file's folder unless the file
(`workdir:`) or the command line (`--workdir`) says otherwise.

This module is the one definition of the format: typed msgspec Structs, one per step
type (a tagged union on `type`), so that a bad file is refused before anything runs with
an error naming the field path (``$.steps[2].repeat``); parameter overrides keep their
declared types; references to undeclared steps, outputs or parameters and cycles are
refused the same way.

Caching, as `dvc repro` does it: a step's cache key hashes its resolved definition
(parameters and upstream outputs substituted), the content of its inputs (files, dataset
versions, model packages) and its code version. A step whose key matches a recorded
success, and whose outputs are still there unchanged, is skipped. The records live in the
registry's SQLite (`pipeline_runs`, `pipeline_steps`: the lineage of every step: inputs,
outputs, parameters, code version); a step is recorded as done in one transaction after
its outputs were written, so a SIGKILL at any point leaves at most a step to redo.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Final, Literal, Union

import msgspec

from .store import Home, RegistryError, _current_user, open_home

FORMAT: Final = "vivace-pipeline/1"
DATA_DIR = Path(__file__).with_name("data")
DEMO_PIPELINE = DATA_DIR / "churn-pipeline.yaml"

StepName = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")]
Positive = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class PipelineError(RegistryError):
    """A pipeline file or its parameters are invalid; the message names the field."""


class StepFailed(Exception):
    """A step's check failed (or its work raised); `checks` holds (check, passed, detail)."""

    def __init__(self, message: str, checks: list[tuple[str, bool, str]] | None = None):
        self.checks = checks or []
        super().__init__(message)


class AwaitingApproval(Exception):
    """A gated step filed a request that another identity must approve."""


# ---- the format ----------------------------------------------------------------------


class _Step(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, tag_field="type"):
    """Fields every step has."""

    name: StepName
    needs: list[StepName] = []
    # Extra files or folders whose content is an input of the step (scripts, configs).
    deps: list[str] = []
    description: str = ""

    # Output name -> type, for references `${steps.NAME.outputs.KEY}` (shell steps declare theirs).
    OUTPUTS: ClassVar[dict[str, type]] = {}

    def output_types(self) -> dict[str, type]:
        return self.OUTPUTS


class DataValidate(_Step, kw_only=True, tag="data.validate"):
    """Validate a file or folder against a schema and version it (`vivace data add`)."""

    dataset: Annotated[str, msgspec.Meta(min_length=1)]
    source: str
    schema: str | None = None
    OUTPUTS: ClassVar[dict[str, type]] = {"ref": str, "name": str, "version": int, "content_hash": str, "rows": int}


class FeaturesHistorical(_Step, kw_only=True, tag="features.historical"):
    """A point-in-time correct training set from the feature store (`vivace features historical`)."""

    entities: str                       # parquet/CSV file of join keys + timestamps, or a dataset name@vN
    features: str | list[str]           # a feature service, or view:feature references
    out: str                            # .parquet or .csv
    timestamp_column: str = "event_timestamp"
    full_feature_names: bool = False
    OUTPUTS: ClassVar[dict[str, type]] = {"path": str, "rows": int}


class Train(_Step, kw_only=True, tag="train"):
    """`vivace train CONFIG`: with `dataset` replacing the config's, and `set` overriding keys."""

    config: str
    dataset: str | None = None
    set: dict[str, Any] = {}            # dotted config keys, e.g. train.epochs: 3
    OUTPUTS: ClassVar[dict[str, type]] = {"run": str, "package": str, "package_sha": str, "weights_sha256": str}


class Slice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A bias check: `metric` per value of `feature` may differ by at most `max_gap`."""

    feature: str
    metric: str = "auc"
    max_gap: NonNegativeFloat
    min_rows: Positive = 50


class Evaluate(_Step, kw_only=True, tag="evaluate"):
    """Score a candidate package on held-out data: thresholds, against the current holder of
    `model@alias` on the same rows, behavioural tests and bias (slice) checks."""

    package: str
    data: str                           # dataset reference (name@vN) of held-out rows
    run: str | None = None              # the training run: its config's behavioural tests
    model: str | None = None            # registered model whose `alias` holder to beat
    alias: str = "production"
    metric: str = "auc"
    direction: Literal["max", "min"] | None = None
    margin: float = 0.0
    thresholds: dict[str, float] = {}   # metric -> the least (or, for losses, the most) allowed
    behavioural_tests: list[dict[str, Any]] | None = None
    slices: list[Slice] = []
    OUTPUTS: ClassVar[dict[str, type]] = {"report": str}


class Package(_Step, kw_only=True, tag="package"):
    """`vivace package MODEL --out OUT --name NAME ARGS...` (a subprocess)."""

    model: str
    out: str
    model_name: str
    args: list[str] = []
    OUTPUTS: ClassVar[dict[str, type]] = {"package": str}


class Quantize(_Step, kw_only=True, tag="quantize"):
    """`vivace quantize SOURCE --out OUT` (a subprocess: the native backend is the engine's)."""

    source: str                         # package directory or registry reference
    out: str
    int8: bool = False
    calibration: str | None = None
    tolerance: float | None = None
    OUTPUTS: ClassVar[dict[str, type]] = {"package": str}


class OutputCheck(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    datatype: str | None = None
    shape: list[int] | None = None
    min: float | None = None
    max: float | None = None
    equals: list[Any] | None = None
    close_to: list[float] | None = None
    tolerance: NonNegativeFloat = 1e-6


class Expect(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    status: int = 200
    outputs: dict[str, OutputCheck] = {}


class Latency(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Budgets in milliseconds over the request's repetitions."""

    p50_ms: NonNegativeFloat | None = None
    p99_ms: NonNegativeFloat | None = None
    max_ms: NonNegativeFloat | None = None


class Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One Open Inference Protocol request: POST /v2/models/{model}/infer with `body`."""

    name: str
    body: dict[str, Any]
    model: str | None = None            # default: the step's served model
    repeat: Positive = 1
    expect: Expect = msgspec.field(default_factory=Expect)
    latency: Latency | None = None


class IntegrationTest(_Step, kw_only=True, tag="integration_test"):
    """Serve `model` on 127.0.0.1 (`vivace serve`, a subprocess) and check declared requests."""

    model: str                          # package directory or registry reference
    served_name: str | None = None      # default: the package's (or the registry's) name
    serve_args: list[str] = []
    requests: Annotated[list[Request], msgspec.Meta(min_length=1)]
    warmup: int = 1
    startup_timeout_s: NonNegativeFloat = 120.0
    OUTPUTS: ClassVar[dict[str, type]] = {"report": str}


class Register(_Step, kw_only=True, tag="register"):
    """Register a package as the next version of `model` (once per package and run)."""

    package: str
    model: str
    run: str | None = None
    description: str = ""
    tags: dict[str, str] = {}
    OUTPUTS: ClassVar[dict[str, type]] = {"model": str, "version": int, "ref": str}


class Promote(_Step, kw_only=True, tag="promote"):
    """Move `model@alias` to `version` through the promotion gate; with `approval`, file a
    request that another identity approves (`vivace models approve ID`) instead."""

    model: str
    version: Positive
    alias: str = "production"
    metric: str = "auc"
    direction: Literal["max", "min"] | None = None
    margin: float = 0.0
    approval: bool = False
    OUTPUTS: ClassVar[dict[str, type]] = {"model": str, "alias": str, "version": int}


class Shell(_Step, kw_only=True, tag="shell"):
    """A user command (`sh -c`, in the workdir); `outputs` are the files it writes."""

    run: str
    outputs: dict[str, str] = {}
    env: dict[str, str] = {}
    timeout_s: NonNegativeFloat | None = None

    def output_types(self) -> dict[str, type]:
        return {key: str for key in self.outputs}


StepDoc = Union[DataValidate, FeaturesHistorical, Train, Evaluate, Package, Quantize, IntegrationTest, Register,
                Promote, Shell]
STEP_TYPES = {cls.__struct_config__.tag: cls for cls in StepDoc.__args__}  # type: ignore[attr-defined]


class PipelineDoc(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: StepName
    steps: Annotated[list[StepDoc], msgspec.Meta(min_length=1)]
    format: Literal["vivace-pipeline/1"] = FORMAT
    description: str = ""
    params: dict[str, Any] = {}
    workdir: str | None = None


def _convert(obj: Any, kind: Any, where: str = "$") -> Any:
    try:
        return msgspec.convert(obj, kind)
    except msgspec.ValidationError as exc:
        message = str(exc)
        if " - at `$" in message:
            message = message.replace(" - at `$", f" - at `{where}", 1)
        else:
            message += f" - at `{where}`"
        raise PipelineError(message) from None


# ---- references ----------------------------------------------------------------------

_REF = re.compile(r"\$\$\{|\$\{([^}]*)\}")
_STEP_REF = re.compile(r"^steps\.([^.]+)\.outputs\.(.+)$")


def _walk(value: Any, where: str, fn: Callable[[str, str], Any]) -> Any:
    if isinstance(value, dict):
        return {k: _walk(v, f"{where}.{k}", fn) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, f"{where}[{i}]", fn) for i, v in enumerate(value)]
    if isinstance(value, str):
        return fn(value, where)
    return value


def substitute(text: str, where: str, resolve: Callable[[str, str], Any], shell: bool = False) -> Any:
    """Replace the references in `text`; a value that is one reference keeps its type."""
    whole = _REF.fullmatch(text)
    if whole and whole.group(1) is not None and not shell:
        return resolve(whole.group(1).strip(), where)

    def one(match: re.Match) -> str:
        if match.group(1) is None:
            return "${"
        value = resolve(match.group(1).strip(), where)
        text = value if isinstance(value, str) else json.dumps(value)
        return shlex.quote(text) if shell else text

    return _REF.sub(one, text)


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def _typed_override(key: str, text: str, default: Any) -> Any:
    """An override's value, parsed as YAML, in the declared parameter's type."""
    import yaml

    if isinstance(default, str):
        return text
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    expected = type(default).__name__
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif default is None:
        ok = True
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise PipelineError(f"parameter {key}: expected {expected} (like its default {default!r}), got {text!r}")
    return value


def apply_overrides(params: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Flat parameters (dotted keys) with `KEY=VALUE` overrides applied, typed."""
    flat: dict[str, Any] = {}
    _flatten("", params, flat)
    flat.pop("", None)
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise PipelineError(f"parameter override {item!r}: expected KEY=VALUE, e.g. train.epochs=3")
        if key not in flat:
            known = ", ".join(sorted(flat)) or "none"
            raise PipelineError(f"parameter override {key!r}: the pipeline declares no such parameter (declared: {known})")
        flat[key] = _typed_override(key, text, flat[key])
    return flat


# ---- loading -------------------------------------------------------------------------


@dataclass
class PlannedStep:
    index: int
    doc: Any                            # the typed step (outputs of other steps as placeholders)
    raw: dict[str, Any]                 # as written: substituted again at run time
    upstream: list[str]                 # needs + steps referenced, in file order

    @property
    def name(self) -> str:
        return str(self.doc.name)

    @property
    def type(self) -> str:
        return str(type(self.doc).__struct_config__.tag)

    @property
    def where(self) -> str:
        return f"$.steps[{self.index}]"


@dataclass
class Pipeline:
    name: str
    path: Path | None
    workdir: Path
    home: Path
    params: dict[str, Any]              # flat, overrides applied
    steps: dict[str, PlannedStep]       # in run order (topological, file order on ties)
    doc: PipelineDoc
    overrides: list[str] = field(default_factory=list)

    def upstream_closure(self, name: str) -> list[str]:
        seen: set[str] = set()
        stack = [name]
        while stack:
            for up in self.steps[stack.pop()].upstream:
                if up not in seen:
                    seen.add(up)
                    stack.append(up)
        return [n for n in self.steps if n in seen]


def builtins(home: Path, workdir: Path | None) -> dict[str, str]:
    values = {"python": sys.executable, "home": str(home), "vivace_data": str(DATA_DIR)}
    if workdir is not None:
        values["workdir"] = str(workdir)
    return values


class Resolver:
    """Resolves references for one step; remembers which parameters and outputs it used."""

    def __init__(self, pipeline_params: dict[str, Any], names: dict[str, tuple[str, dict[str, type]]],
                 values: dict[str, str],
                 outputs: dict[str, dict[str, Any]] | None):
        self.params = pipeline_params
        self.names = names              # step name -> (type, output name -> type)
        self.values = values
        self.outputs = outputs          # None: placeholders (load time)
        self.used_params: dict[str, Any] = {}
        self.used_outputs: dict[str, Any] = {}
        self.steps: list[str] = []

    def __call__(self, ref: str, where: str) -> Any:
        if ref.startswith("params."):
            key = ref[len("params."):]
            if key in self.params:
                self.used_params[key] = self.params[key]
                return self.params[key]
            nested = {k[len(key) + 1:]: v for k, v in self.params.items() if k.startswith(key + ".")}
            if nested:
                self.used_params.update({f"{key}.{k}": v for k, v in nested.items()})
                return _unflatten(nested)
            raise PipelineError(f"{where}: ${{{ref}}} names an undeclared parameter "
                                f"(declared: {', '.join(sorted(self.params)) or 'none'})")
        match = _STEP_REF.match(ref)
        if match:
            step, key = match.groups()
            if step not in self.names:
                raise PipelineError(f"{where}: ${{{ref}}} names an undeclared step {step!r}")
            tag, types = self.names[step]
            if key not in types:
                raise PipelineError(f"{where}: ${{{ref}}}: step {step!r} ({tag})"
                                    f" has no output {key!r} (outputs: {', '.join(types) or 'none'})")
            if step not in self.steps:
                self.steps.append(step)
            if self.outputs is None:
                return 1 if types[key] is int else f"<{ref}>"
            value = self.outputs[step][key]
            self.used_outputs[ref] = value
            return value
        if ref in self.values:
            return self.values[ref]
        raise PipelineError(f"{where}: unknown reference ${{{ref}}} (use params.NAME, steps.NAME.outputs.KEY, "
                            f"{', '.join(sorted(self.values))}; write $${{ for a literal ${{)")


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


def resolve_step(raw: dict[str, Any], where: str, resolver: Resolver) -> Any:
    """Substitute a step's references and convert it to its typed Struct."""
    shell = raw.get("type") == "shell"

    def fn(text: str, path: str) -> Any:
        return substitute(text, path, resolver, shell=shell and path == f"{where}.run")

    return _convert(_walk(raw, where, fn), StepDoc, where)


def load_pipeline(path: str | os.PathLike | None, home: str | os.PathLike | Home | None = None,
                  overrides: list[str] | None = None, workdir: str | os.PathLike | None = None,
                  text: str | None = None) -> Pipeline:
    """Parse and check a pipeline file: types, parameters, references, the DAG. Nothing runs."""
    import yaml

    home_path = open_home(home).path if isinstance(home, Home) else Path(home or os.environ.get(
        "VIVACE_HOME", "./.vivace")).absolute()
    file = Path(path).absolute() if path is not None else None
    if text is None:
        if file is None:
            raise PipelineError("no pipeline file given")
        try:
            text = file.read_text()
        except OSError as exc:
            raise PipelineError(f"cannot read pipeline file {path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PipelineError(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise PipelineError(f"{path}: a pipeline file is a mapping (name, params, steps)")
    # The document's shape first (names, types, fields), references still unresolved where
    # they stand for typed values: `_convert` below checks them once substituted.
    head = {k: v for k, v in data.items() if k != "steps"}
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, list) or not raw_steps:
        raise PipelineError("Expected a non-empty list of steps - at `$.steps`")
    for i, raw in enumerate(raw_steps):
        if not isinstance(raw, dict):
            raise PipelineError(f"Expected `object`, got `{type(raw).__name__}` - at `$.steps[{i}]`")
        if raw.get("type") not in STEP_TYPES:
            raise PipelineError(f"Unknown step type {raw.get('type')!r} - at `$.steps[{i}].type` "
                                f"(types: {', '.join(STEP_TYPES)})")
    if not isinstance(head.get("params") or {}, dict):
        raise PipelineError("Expected `object`, got `" + type(head["params"]).__name__ + "` - at `$.params`")
    params = apply_overrides(head.get("params") or {}, overrides or [])
    values = builtins(home_path, None)
    base = file.parent if file is not None else Path.cwd()
    if workdir is not None:
        wd = Path(workdir).absolute()
    elif isinstance(head.get("workdir"), str):
        wd_text = substitute(head["workdir"], "$.workdir", Resolver(params, {}, values, None))
        wd = (base / str(wd_text)).absolute()
    else:
        wd = base
    values = builtins(home_path, wd)

    # References to other steps' outputs are checked against their declared names and
    # types, read first; then each step is converted with placeholders for those outputs.
    names: dict[str, tuple[str, dict[str, type]]] = {}
    for i, raw in enumerate(raw_steps):
        head_step = _convert({k: v for k, v in raw.items() if k in ("name", "type")}, _StepHead, f"$.steps[{i}]")
        if head_step.name in names:
            raise PipelineError(f"$.steps[{i}].name: step name {head_step.name!r} is used twice")
        declared = raw.get("outputs") if head_step.type == "shell" else None
        types = ({str(k): str for k in declared} if isinstance(declared, dict)
                 else dict(STEP_TYPES[head_step.type].OUTPUTS))
        names[head_step.name] = (head_step.type, types)
    planned: list[PlannedStep] = []
    for i, raw in enumerate(raw_steps):
        resolver = Resolver(params, names, values, None)
        doc = resolve_step(raw, f"$.steps[{i}]", resolver)
        for j, need in enumerate(doc.needs):
            if need not in names:
                raise PipelineError(f"$.steps[{i}].needs[{j}]: unknown step {need!r}")
        upstream = list(dict.fromkeys([*doc.needs, *resolver.steps]))
        if doc.name in upstream:
            raise PipelineError(f"$.steps[{i}]: step {doc.name!r} depends on itself")
        planned.append(PlannedStep(i, doc, raw, upstream))
    head_doc = _convert({**head, "steps": [msgspec.to_builtins(p.doc) for p in planned]}, PipelineDoc)
    order = _topological(planned)
    return Pipeline(head_doc.name, file, wd, home_path, params, {p.name: p for p in order}, head_doc,
                    list(overrides or []))


class _StepHead(msgspec.Struct):
    name: StepName
    type: Literal[tuple(STEP_TYPES)]  # type: ignore[valid-type]


def _topological(steps: list[PlannedStep]) -> list[PlannedStep]:
    """Run order: every step after its upstream steps, file order where free; cycles refused."""
    by_name = {s.name: s for s in steps}
    done: list[PlannedStep] = []
    placed: set[str] = set()
    pending = list(steps)
    while pending:
        ready = next((s for s in pending if all(u in placed for u in s.upstream)), None)
        if ready is None:
            raise PipelineError(f"$.steps: the steps form a cycle: {' -> '.join(_cycle(pending, by_name))}")
        pending.remove(ready)
        placed.add(ready.name)
        done.append(ready)
    return done


def _cycle(pending: list[PlannedStep], by_name: dict[str, PlannedStep]) -> list[str]:
    left = {s.name for s in pending}
    path: list[str] = []
    node = pending[0].name
    while node not in path:
        path.append(node)
        node = next(u for u in by_name[node].upstream if u in left)
    return path[path.index(node):] + [node]


def pipeline_source(demo: bool, file: str | None) -> str:
    if demo == (file is not None):
        raise PipelineError("give a pipeline file, or --demo for the bundled churn pipeline")
    return str(DEMO_PIPELINE) if demo else str(file)


# ---- records in the registry ---------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pipeline_runs (
    id TEXT PRIMARY KEY,
    pipeline TEXT NOT NULL,
    file TEXT NOT NULL,
    params TEXT NOT NULL,           -- JSON: the parameters after overrides
    status TEXT NOT NULL,           -- running | succeeded | failed | waiting | interrupted
    user TEXT NOT NULL,
    pid INTEGER NOT NULL,
    environment TEXT NOT NULL,      -- JSON: python, packages, git commit of the workdir
    started_at REAL NOT NULL,
    ended_at REAL
);
CREATE TABLE IF NOT EXISTS pipeline_steps (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    pipeline TEXT NOT NULL,
    step TEXT NOT NULL,
    type TEXT NOT NULL,
    status TEXT NOT NULL,           -- done | cached | failed | waiting
    cache_key TEXT NOT NULL,
    definition TEXT NOT NULL,       -- JSON: the step as it ran, references resolved
    params TEXT NOT NULL,           -- JSON: parameters it used
    upstream TEXT NOT NULL,         -- JSON: upstream outputs it used
    inputs TEXT NOT NULL,           -- JSON: input -> content hash
    code TEXT NOT NULL,             -- JSON: code version (sha256, vivace version)
    outputs TEXT NOT NULL,          -- JSON
    artifacts TEXT NOT NULL,        -- JSON: path -> content hash when recorded
    details TEXT NOT NULL,          -- JSON: checks, metrics, the cached record's id
    error TEXT,
    started_at REAL NOT NULL,
    ended_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS pipeline_steps_by_key ON pipeline_steps (pipeline, step, cache_key);
"""


def ensure_tables(home: Home) -> None:
    if not home.db.execute("SELECT 1 FROM sqlite_master WHERE name = 'pipeline_steps'").fetchone():
        home.db.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")


_JSON_COLUMNS = ("definition", "params", "upstream", "inputs", "code", "outputs", "artifacts", "details")


def _step_row(row: Any) -> dict[str, Any]:
    out = dict(row)
    for key in _JSON_COLUMNS:
        out[key] = json.loads(out[key])
    return out


def cached_record(home: Home, pipeline: str, step: str, key: str) -> dict[str, Any] | None:
    row = home.db.execute("SELECT * FROM pipeline_steps WHERE pipeline = ? AND step = ? AND cache_key = ? AND "
                          "status IN ('done', 'cached') ORDER BY id DESC LIMIT 1", (pipeline, step, key)).fetchone()
    return _step_row(row) if row else None


def latest_record(home: Home, pipeline: str, step: str) -> dict[str, Any] | None:
    row = home.db.execute("SELECT * FROM pipeline_steps WHERE pipeline = ? AND step = ? AND "
                          "status IN ('done', 'cached') ORDER BY id DESC LIMIT 1", (pipeline, step)).fetchone()
    return _step_row(row) if row else None


def list_pipeline_runs(home: Home | str | os.PathLike | None, pipeline: str | None = None) -> list[dict[str, Any]]:
    home = open_home(home)
    ensure_tables(home)
    sql = "SELECT * FROM pipeline_runs" + (" WHERE pipeline = ?" if pipeline else "") + " ORDER BY started_at"
    rows = [dict(r) for r in home.db.execute(sql, (pipeline,) if pipeline else ())]
    for r in rows:
        r["params"], r["environment"] = json.loads(r["params"]), json.loads(r["environment"])
        if r["status"] == "running" and not _alive(r["pid"]):
            r["status"] = "interrupted"
    return rows


def run_steps(home: Home | str | os.PathLike | None, run_id: str) -> list[dict[str, Any]]:
    """A pipeline run's step records (its lineage), in the order they ran."""
    home = open_home(home)
    ensure_tables(home)
    rows = home.db.execute("SELECT * FROM pipeline_steps WHERE run_id LIKE ? ORDER BY id", (run_id + "%",))
    return [_step_row(r) for r in rows]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _lock(home: Path, pipeline: str) -> Iterator[None]:
    folder = home / "pipelines" / pipeline
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PipelineError(f"pipeline {pipeline!r} is already running in {home}") from None
        yield


# ---- planning (status) and running ---------------------------------------------------


@dataclass
class Decision:
    step: str
    run: bool
    reasons: list[str]
    record: dict[str, Any] | None = None     # the cached record used when not running
    resolved: Any = None
    key: str = ""
    components: dict[str, Any] = field(default_factory=dict)


def _key(components: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(components, sort_keys=True, default=str).encode()).hexdigest()


def _diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    reasons = []
    for key in sorted(set(old["params"]) | set(new["params"])):
        if old["params"].get(key) != new["params"].get(key):
            reasons.append(f"parameter {key} changed ({old['params'].get(key)!r} -> {new['params'].get(key)!r})")
    changed: dict[str, list[str]] = {}
    for ref in sorted(set(old["upstream"]) | set(new["upstream"])):
        if old["upstream"].get(ref) != new["upstream"].get(ref):
            match = _STEP_REF.match(ref)
            step, key = match.groups() if match else (ref, "")
            changed.setdefault(step, []).append(key)
    reasons += [f"upstream {step} changed ({', '.join(keys)})" for step, keys in changed.items()]
    for name in sorted(set(old["inputs"]) | set(new["inputs"])):
        if old["inputs"].get(name) != new["inputs"].get(name):
            reasons.append(f"input {name} changed")
    if old["code"].get("sha256") != new["code"].get("sha256"):
        reasons.append("code changed" + (f" (vivace {old['code'].get('vivace')} -> {new['code'].get('vivace')})"
                                         if old["code"].get("vivace") != new["code"].get("vivace") else ""))
    if not reasons and old["definition"] != new["definition"]:
        keys = sorted(k for k in set(old["definition"]) | set(new["definition"])
                      if old["definition"].get(k) != new["definition"].get(k))
        reasons.append(f"step definition changed ({', '.join(keys)})")
    return reasons or ["no matching record"]


class Runner:
    """Plans and runs one pipeline against one home."""

    def __init__(self, pipeline: Pipeline, home: Home, log: Callable[[str], None] = print):
        from . import pipeline_steps

        self.p = pipeline
        self.home = home
        self.log = log
        self.steps = pipeline_steps
        ensure_tables(home)

    def _resolve(self, step: PlannedStep, outputs: dict[str, dict[str, Any]]) -> tuple[Any, Resolver]:
        resolver = Resolver(self.p.params, {n: (s.type, s.doc.output_types()) for n, s in self.p.steps.items()},
                            builtins(self.p.home, self.p.workdir), outputs)
        return resolve_step(step.raw, step.where, resolver), resolver

    def decide(self, step: PlannedStep, outputs: dict[str, dict[str, Any]], will_run: set[str],
               force: Collection[str]) -> Decision:
        upstream_running = [u for u in step.upstream if u in will_run]
        if upstream_running:
            return Decision(step.name, True, [f"upstream {', '.join(upstream_running)} will run"])
        try:
            resolved, resolver = self._resolve(step, outputs)
        except PipelineError as exc:
            return Decision(step.name, True, [f"cannot resolve: {exc}"])
        ctx = self.steps.Context(self.home, self.p, step.name, "", self.log)
        try:
            inputs = self.steps.input_hashes(resolved, ctx)
        except (RegistryError, OSError, ValueError) as exc:
            inputs = {"unavailable": str(exc)}
        components = {"type": step.type, "definition": msgspec.to_builtins(resolved), "params": resolver.used_params,
                      "upstream": resolver.used_outputs, "inputs": inputs, "code": self.steps.code_version(step.type)}
        key = _key({k: v for k, v in components.items() if k != "params" and k != "upstream"}
                   | {"code": components["code"]["sha256"]})
        decision = Decision(step.name, True, [], None, resolved, key, components)
        if step.name in force:
            decision.reasons = ["forced (--force)"]
            return decision
        record = cached_record(self.home, self.p.name, step.name, key)
        if record is not None:
            problem = self.steps.still_valid(resolved, record, ctx)
            if problem is None:
                decision.run, decision.record = False, record
                return decision
            decision.reasons = [problem]
            return decision
        latest = latest_record(self.home, self.p.name, step.name)
        decision.reasons = ["never run"] if latest is None else _diff(latest, components)
        if "unavailable" in inputs:
            decision.reasons = [f"inputs cannot be read: {inputs['unavailable']}"]
        failed = self.home.db.execute(
            "SELECT run_id, status, error FROM pipeline_steps WHERE pipeline = ? AND step = ? AND cache_key = ? AND "
            "status IN ('failed', 'waiting') ORDER BY id DESC LIMIT 1", (self.p.name, step.name, key)).fetchone()
        if failed is not None:
            first = ((failed["error"] or "").splitlines() or [""])[0][:100]
            decision.reasons.insert(0, f"{failed['status']} in run {failed['run_id']}: {first}")
        return decision

    def selected(self, until: str | None) -> list[PlannedStep]:
        if until is None:
            return list(self.p.steps.values())
        if until not in self.p.steps:
            raise PipelineError(f"--until {until!r}: no such step (steps: {', '.join(self.p.steps)})")
        keep = set(self.p.upstream_closure(until)) | {until}
        return [s for n, s in self.p.steps.items() if n in keep]

    def plan(self, force: Collection[str] = (), until: str | None = None) -> list[Decision]:
        """What `run` would do, and why; runs nothing."""
        self._check_force(force)
        outputs: dict[str, dict[str, Any]] = {}
        will_run: set[str] = set()
        decisions = []
        for step in self.selected(until):
            decision = self.decide(step, outputs, will_run, force)
            if decision.run or decision.record is None:
                will_run.add(step.name)
            else:
                outputs[step.name] = decision.record["outputs"]
            decisions.append(decision)
        return decisions

    def _check_force(self, force: Collection[str]) -> None:
        unknown = sorted(set(force) - set(self.p.steps))
        if unknown:
            raise PipelineError(f"--force {', '.join(unknown)}: no such step (steps: {', '.join(self.p.steps)})")

    def run(self, force: Collection[str] = (), until: str | None = None) -> RunReport:
        from .runs import environment_info

        self._check_force(force)
        selected = self.selected(until)
        self.p.workdir.mkdir(parents=True, exist_ok=True)
        with _lock(self.p.home, self.p.name):
            self._close_interrupted()
            run_id = uuid.uuid4().hex[:12]
            with self.home.transaction() as db:
                db.execute("INSERT INTO pipeline_runs (id, pipeline, file, params, status, user, pid, environment,"
                           " started_at) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?)",
                           (run_id, self.p.name, str(self.p.path or ""), json.dumps(self.p.params), _current_user(),
                            os.getpid(), json.dumps(_environment(environment_info, self.p.workdir)), time.time()))
            report = RunReport(self.p, run_id)
            self.log(f"pipeline {self.p.name}: run {run_id} ({len(selected)} steps, home {self.p.home})")
            outputs: dict[str, dict[str, Any]] = {}
            spans = _PipelineSpans.start(self.p.name, run_id)
            try:
                for step in selected:
                    # A failed (or waiting) step stops what depends on it; other branches go on.
                    after = [u for u in step.upstream if u in report.blocked]
                    if after:
                        report.blocked.add(step.name)
                        report.results.append(StepResult(step.name, step.type, "not run", 0.0,
                                                         f"after {', '.join(after)}"))
                        continue
                    with spans.step(step.name, step.type) as span:
                        self._run_step(step, outputs, force, report)
                        if span is not None and report.results:
                            span.set_attribute("vivace.step.result", report.results[-1].result)
            finally:
                spans.end(report.status)
                status = report.status
                with self.home.transaction() as db:
                    db.execute("UPDATE pipeline_runs SET status = ?, ended_at = ? WHERE id = ?",
                               (status if status != "running" else "interrupted", time.time(), run_id))
        return report

    def _close_interrupted(self) -> None:
        # We hold the pipeline's lock: a run still marked running was killed.
        with self.home.transaction() as db:
            db.execute("UPDATE pipeline_runs SET status = 'interrupted' WHERE pipeline = ? AND status = 'running'",
                       (self.p.name,))

    def _run_step(self, step: PlannedStep, outputs: dict[str, dict[str, Any]], force: Collection[str],
                  report: RunReport) -> None:
        started = time.time()
        decision = self.decide(step, outputs, set(), force)
        if not decision.run:
            record = decision.record
            assert record is not None
            outputs[step.name] = record["outputs"]
            origin = record["details"].get("from_run", record["run_id"])
            self._record(report.run_id, step, "cached", decision, record["outputs"], record["artifacts"],
                         {**record["details"], "from_run": origin, "from_record": record["details"].get(
                             "from_record", record["id"])}, None, started)
            report.results.append(StepResult(step.name, step.type, "cached", time.time() - started,
                                             f"from run {origin}"))
            self.log(f"  {step.name:<20} cached (run {origin})")
            return
        if decision.resolved is None:  # could not resolve or hash: a failure of this step
            self._fail(report, step, decision, StepFailed("; ".join(decision.reasons)), started)
            return
        self.log(f"  {step.name:<20} running {step.type}: {'; '.join(decision.reasons)}")
        ctx = self.steps.Context(self.home, self.p, step.name, report.run_id, self.log)
        try:
            result = self.steps.run_step(decision.resolved, ctx)
        except AwaitingApproval as exc:
            self._record(report.run_id, step, "waiting", decision, {}, {}, {}, str(exc), started)
            report.results.append(StepResult(step.name, step.type, "waiting", time.time() - started, str(exc)))
            report.blocked.add(step.name)
            report.waiting = str(exc)
            self.log(f"  {step.name:<20} waiting: {exc}")
            return
        except StepFailed as exc:
            self._fail(report, step, decision, exc, started)
            return
        except Exception as exc:  # noqa: BLE001 - any error fails the step, recorded with its type
            self._fail(report, step, decision, StepFailed(f"{type(exc).__name__}: {exc}"), started)
            return
        artifacts = {str(p): self.steps.hash_path(p) for p in result.artifacts}
        self._record(report.run_id, step, "done", decision, result.outputs, artifacts, result.details, None, started)
        outputs[step.name] = result.outputs
        report.results.append(StepResult(step.name, step.type, "ran", time.time() - started, result.summary))
        self.log(f"  {step.name:<20} done in {time.time() - started:.1f}s" + (f": {result.summary}" if result.summary
                                                                               else ""))

    def _fail(self, report: RunReport, step: PlannedStep, decision: Decision, exc: StepFailed, started: float) -> None:
        details = {"checks": [{"check": c, "passed": ok, "detail": d} for c, ok, d in exc.checks]}
        self._record(report.run_id, step, "failed", decision, {}, {}, details, str(exc), started)
        report.results.append(StepResult(step.name, step.type, "FAILED", time.time() - started, str(exc)))
        report.blocked.add(step.name)
        if report.failure is None:
            report.failure = (step.name, step.type, str(exc), exc.checks)
        report.failures.append(step.name)
        self.log(f"  {step.name:<20} FAILED: {str(exc).splitlines()[0]}")

    def _record(self, run_id: str, step: PlannedStep, status: str, decision: Decision, outputs: dict[str, Any],
                artifacts: dict[str, Any], details: dict[str, Any], error: str | None, started: float) -> None:
        c = decision.components or {"definition": {}, "params": {}, "upstream": {}, "inputs": {}, "code": {}}
        with self.home.transaction() as db:
            db.execute(
                "INSERT INTO pipeline_steps (run_id, pipeline, step, type, status, cache_key, definition, params,"
                " upstream, inputs, code, outputs, artifacts, details, error, started_at, ended_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run_id, self.p.name, step.name, step.type, status, decision.key, json.dumps(c["definition"]),
                 json.dumps(c["params"]), json.dumps(c["upstream"], default=str), json.dumps(c["inputs"]),
                 json.dumps(c["code"]), json.dumps(outputs), json.dumps(artifacts), json.dumps(details, default=str),
                 error, started, time.time()))
            if status != "cached":
                self.home.audit(f"pipeline.step.{status}", f"pipeline/{self.p.name}/{step.name}", "",
                                {"run": run_id, "type": step.type, "cache_key": decision.key, "outputs": outputs})


def _environment(environment_info: Callable[[], dict[str, Any]], workdir: Path) -> dict[str, Any]:
    """The run's environment with the git commit of the workdir (the user's code)."""
    here = os.getcwd()
    try:
        os.chdir(workdir if workdir.is_dir() else here)
        return environment_info()
    finally:
        os.chdir(here)


@dataclass
class StepResult:
    step: str
    type: str
    result: str                         # ran | cached | FAILED | waiting | not run
    seconds: float
    note: str = ""


@dataclass
class RunReport:
    pipeline: Pipeline
    run_id: str
    results: list[StepResult] = field(default_factory=list)
    blocked: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    failure: tuple[str, str, str, list[tuple[str, bool, str]]] | None = None    # the first
    waiting: str | None = None

    @property
    def status(self) -> str:
        if self.failure:
            return "failed"
        if self.waiting:
            return "waiting"
        return "succeeded" if all(r.result in ("ran", "cached") for r in self.results) else "running"

    def ran(self) -> list[str]:
        return [r.step for r in self.results if r.result == "ran"]

    def cached(self) -> list[str]:
        return [r.step for r in self.results if r.result == "cached"]

    def text(self) -> str:
        rows = [["STEP", "TYPE", "RESULT", "TIME", "NOTE"]]
        rows += [[r.step, r.type, r.result, f"{r.seconds:.1f}s", (r.note.splitlines() or [""])[0][:80]]
                 for r in self.results]
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        if self.failure:
            name, kind, message, checks = self.failure
            lines.append(f"\nstep {name!r} ({kind}) failed: {message}")
            if len(self.failures) > 1:
                lines.append(f"(also failed: {', '.join(self.failures[1:])}; `vivace pipeline show {self.run_id}`)")
            for check, ok, detail in checks:
                if not ok:
                    lines.append(f"  [FAIL] {check}: {detail}")
            blocked = [r.step for r in self.results if r.result == "not run"]
            if blocked:
                lines.append(f"not run: {', '.join(blocked)}")
            kept = len(self.ran()) + len(self.cached())
            lines.append("fix the cause and run again" + (f": the {kept} steps that succeeded are kept (cached then)"
                                                            if kept else ""))
        elif self.waiting:
            lines.append(f"\n{self.waiting}")
        else:
            lines.append(f"\npipeline {self.pipeline.name} succeeded: {len(self.ran())} ran, {len(self.cached())} cached"
                         f" (run {self.run_id})")
        return "\n".join(lines)


class _PipelineSpans:
    """With VIVACE_TRACE_ENDPOINT set (monitor/tracing.py Tracing.from_env), a run is one
    trace: a span for the run (continuing TRACEPARENT when the runner was given one) and
    one per step, current while the step runs, so that its subprocesses get it as their
    TRACEPARENT. Without it, nothing."""

    def __init__(self, tracing: Any = None, root: Any = None, token: Any = None):
        self.tracing = tracing
        self.root = root
        self.token = token

    @classmethod
    def start(cls, pipeline: str, run_id: str) -> _PipelineSpans:
        from vivace.monitor.tracing import Tracing

        tracing = Tracing.from_env()
        if tracing is None:
            return cls()
        sampled, parent = tracing.sample(os.environ.get("TRACEPARENT"))
        if not sampled:
            tracing.shutdown()
            return cls()
        from opentelemetry import context as otel_context

        root = tracing.span(f"pipeline {pipeline}", tracing.context(parent, os.environ.get("TRACESTATE")), "internal",
                            {"vivace.pipeline": pipeline, "vivace.pipeline.run_id": run_id})
        token = otel_context.attach(tracing.child_context(root))
        return cls(tracing, root, token)

    @contextmanager
    def step(self, name: str, kind: str) -> Iterator[Any]:
        if self.tracing is None:
            yield None
            return
        with self.tracing.tracer.start_as_current_span(f"pipeline.step {name}",
                                                       attributes={"vivace.step": name, "vivace.step.type": kind}) as span:
            yield span

    def end(self, status: str) -> None:
        if self.tracing is None:
            return
        from opentelemetry import context as otel_context

        self.root.set_attribute("vivace.pipeline.status", status)
        self.root.end()
        otel_context.detach(self.token)
        self.tracing.shutdown()  # exports the run's spans before the command exits
