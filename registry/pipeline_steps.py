"""What each pipeline step type does (registry/pipeline.py defines the format and runs them).

Every step type has three parts here: its input hashes (what invalidates its cache), its
work (returning outputs and the artifacts written), and a check that a cached result is
still there (files unchanged, registry versions present, the alias still where it was
put). Steps that need the serving engine — `integration_test`, `quantize`, `package` —
run the public `vivace` command in a subprocess: the registry never imports the engine.
"""
from __future__ import annotations

import ctypes
import hashlib
import http.client
import importlib.metadata
import inspect
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from .pipeline import (
    DataValidate, Evaluate, FeaturesHistorical, IntegrationTest, Package, Pipeline, Promote, Quantize, Register, Shell,
    StepFailed, AwaitingApproval, Train,
)
from .store import Home, NotFoundError, RegistryError


def _child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """A step's subprocess environment: with tracing on (VIVACE_TRACE_ENDPOINT), the
    current step span as TRACEPARENT (OpenTelemetry's environment carrier)."""
    from vivace.monitor.tracing import inject_env

    return dict(inject_env(dict(os.environ) if env is None else env))

REGISTRY_DIR = Path(__file__).parent


@dataclass
class Context:
    home: Home
    pipeline: Pipeline
    step: str
    run_id: str
    log: Callable[[str], None]

    def path(self, value: str | os.PathLike) -> Path:
        path = Path(value)
        return path if path.is_absolute() else self.pipeline.workdir / path

    @property
    def step_dir(self) -> Path:
        folder = self.home.path / "pipelines" / self.pipeline.name / "runs" / self.run_id / self.step
        folder.mkdir(parents=True, exist_ok=True)
        return folder


@dataclass
class Result:
    outputs: dict[str, Any]
    artifacts: list[Path] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


# ---- hashing -------------------------------------------------------------------------


def hash_path(path: str | os.PathLike) -> str | None:
    """SHA-256 of a file, or of a folder's sorted (relative path, file hash) list; None if absent."""
    path = Path(path)
    if path.is_file():
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                h.update(block)
        return h.hexdigest()
    if path.is_dir():
        listing = []
        for child in sorted(path.rglob("*")):
            if child.is_file() and "__pycache__" not in child.parts:
                listing.append((child.relative_to(path).as_posix(), hash_path(child)))
        return hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    return None


def _dataset_hash(home: Home, ref: str) -> str:
    from .data import get_dataset

    version = get_dataset(home, ref)
    return f"{version.ref}:{version.content_hash}"


def _package_hash(home: Home, ctx: Context, ref: str) -> str | None:
    """A package directory's content hash, or a registry reference's package sha."""
    if ctx.path(ref).is_dir():
        return hash_path(ctx.path(ref))
    from .models import get_version

    version = get_version(home, ref)
    return f"{version.ref}:{version.package_sha}"


def input_hashes(step: Any, ctx: Context) -> dict[str, Any]:
    """What the step reads, by content: its cache key changes when any of it does."""
    home = ctx.home
    out: dict[str, Any] = {f"deps:{d}": hash_path(ctx.path(d)) for d in step.deps}
    if isinstance(step, DataValidate):
        out["source"] = hash_path(ctx.path(step.source))
        if step.schema:
            out["schema"] = hash_path(ctx.path(step.schema))
    elif isinstance(step, FeaturesHistorical):
        entities = ctx.path(step.entities)
        out["entities"] = hash_path(entities) if entities.exists() else _dataset_hash(home, step.entities)
        out["feature_store"] = _feature_store_hash(home, step.features)
    elif isinstance(step, Train):
        from .train import load_config

        out["config"] = hash_path(ctx.path(step.config))
        config = load_config(ctx.path(step.config))
        dataset = step.dataset or config.get("dataset") or (config.get("training_set") or {}).get("entities")
        if isinstance(dataset, str):
            out["dataset"] = _dataset_hash(home, dataset)
    elif isinstance(step, Evaluate):
        out["package"] = _package_hash(home, ctx, step.package)
        out["data"] = _dataset_hash(home, step.data)
        # The holder of model@alias is not an input: it moves when this candidate is promoted.
        # A cached result is redone when the holder became another model (still_valid).
    elif isinstance(step, Package):
        out["model"] = hash_path(ctx.path(step.model.split(":")[0]) if ".py:" in step.model else ctx.path(step.model))
    elif isinstance(step, Quantize):
        out["source"] = _package_hash(home, ctx, step.source)
        if step.calibration:
            out["calibration"] = hash_path(ctx.path(step.calibration))
    elif isinstance(step, IntegrationTest):
        out["model"] = _package_hash(home, ctx, step.model)
    elif isinstance(step, Register):
        out["package"] = hash_path(ctx.path(step.package))
    elif isinstance(step, Promote):
        from .models import get_version

        out["version"] = get_version(home, f"{step.model}/{step.version}").package_sha
    return out


def _feature_store_hash(home: Home, features: str | list[str]) -> str:
    """The definitions of the views the features come from, and their source files."""
    from vivace.features import FeatureStore

    store = FeatureStore(home.path)
    refs = store.get_feature_service(features).features if isinstance(features, str) else list(features)
    views = sorted({ref.split(":", 1)[0] for ref in refs})
    parts = []
    for name in views:
        view = store.get_feature_view(name)
        parts.append([name, repr(view), hash_path(view.source) if Path(view.source).exists() else view.source])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


# Modules whose code a step type runs in this process (besides its function below).
_CODE_MODULES = {
    "data.validate": ["data.py"], "train": ["train.py", "data.py"], "evaluate": ["train.py"],
    "register": ["models.py"], "promote": ["models.py", "approvals.py"],
}
_code_cache: dict[str, dict[str, str]] = {}


def code_version(step_type: str) -> dict[str, str]:
    """The step's code version: its implementation, the modules it runs, the vivace version."""
    if step_type not in _code_cache:
        try:
            version = importlib.metadata.version("vivace")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        h = hashlib.sha256(version.encode())
        h.update(inspect.getsource(_IMPLEMENTATIONS[step_type]).encode())
        for module in _CODE_MODULES.get(step_type, []):
            h.update((REGISTRY_DIR / module).read_bytes())
        _code_cache[step_type] = {"sha256": h.hexdigest(), "vivace": version}
    return _code_cache[step_type]


def _holder(home: Home, model: str, alias: str) -> str | None:
    """'name/N:package sha' of the version `model@alias` names, or None."""
    from .models import get_version

    try:
        version = get_version(home, f"{model}@{alias}")
    except NotFoundError:
        return None
    return f"{version.ref}:{version.package_sha}"


def still_valid(step: Any, record: dict[str, Any], ctx: Context) -> str | None:
    """None when a cached result can be reused; otherwise why not."""
    for path, digest in record["artifacts"].items():
        actual = hash_path(path)
        if actual is None:
            return f"output {path} is missing"
        if actual != digest:
            return f"output {path} changed since it was written"
    outputs = record["outputs"]
    try:
        if isinstance(step, DataValidate):
            from .data import get_dataset

            get_dataset(ctx.home, outputs["ref"])
        elif isinstance(step, Register):
            from .models import get_version

            get_version(ctx.home, outputs["ref"])
        elif isinstance(step, Evaluate) and step.model:
            holder = _holder(ctx.home, step.model, step.alias)
            compared = record["details"].get("holder")
            candidate = record["details"].get("package_sha256")
            if holder is not None and holder != compared and holder.split(":")[-1] != candidate:
                return f"{step.model}@{step.alias} is now {holder.split(':')[0]}, not what it was evaluated against"
        elif isinstance(step, Promote):
            from .models import get_version

            current = get_version(ctx.home, f"{step.model}@{step.alias}")
            if current.version != step.version:
                return f"{step.model}@{step.alias} points at version {current.version}, not {step.version}"
    except NotFoundError as exc:
        return f"recorded output is gone: {exc}"
    return None


# ---- running -------------------------------------------------------------------------


def run_step(step: Any, ctx: Context) -> Result:
    tag = type(step).__struct_config__.tag
    return _IMPLEMENTATIONS[tag](step, ctx)


def _write_json(path: Path, data: Any) -> Path:
    """Write JSON atomically: a temporary file in the same folder, fsynced, then renamed."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


try:  # resolved here, not in the forked child (which may not load libraries safely)
    _prctl: Any = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    """In a child: be killed when the pipeline runner dies (even by SIGKILL); Linux only."""
    if _prctl is not None:
        _prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _vivace(ctx: Context, args: list[str], log_name: str) -> str:
    """Run the public `vivace` command; its output goes to a log file; StepFailed on failure."""
    log_path = ctx.step_dir / f"{log_name}.log"
    command = [sys.executable, "-m", "vivace", "--home", str(ctx.home.path), *args]
    ctx.log(f"    $ vivace {' '.join(args)}")
    with open(log_path, "w") as log:
        proc = subprocess.run(command, cwd=ctx.pipeline.workdir, stdout=log, stderr=subprocess.STDOUT,
                              preexec_fn=_die_with_parent, env=_child_env())
    output = log_path.read_text()
    if proc.returncode != 0:
        tail = "\n".join(output.strip().splitlines()[-5:])
        raise StepFailed(f"`vivace {args[0]}` exited with status {proc.returncode}: {tail}")
    return output


def _data_validate(step: DataValidate, ctx: Context) -> Result:
    from .data import SchemaViolation, add_dataset

    try:
        version, created = add_dataset(ctx.home, step.dataset, ctx.path(step.source),
                                       ctx.path(step.schema) if step.schema else None)
    except SchemaViolation as exc:
        raise StepFailed(f"{step.source} breaks its schema ({len(exc.violations)} violations); no version created",
                         [(f"column {col!r}: {rule}", False, detail) for col, rule, detail in exc.violations]) from None
    return Result({"ref": version.ref, "name": version.name, "version": version.version,
                   "content_hash": version.content_hash, "rows": version.row_count},
                  details={"created": created},
                  summary=f"{version.ref}, {version.row_count} rows" + ("" if created else " (same content)"))


def _features_historical(step: FeaturesHistorical, ctx: Context) -> Result:
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vivace.features import FeatureStore, FeatureStoreError

    from .data import open_dataset

    entities = ctx.path(step.entities)
    if entities.is_file():
        frame = pd.read_csv(entities) if entities.suffix == ".csv" else pq.read_table(entities).to_pandas()
    else:
        frame = open_dataset(step.entities, ctx.home)
    if step.timestamp_column in frame and not pd.api.types.is_datetime64_any_dtype(frame[step.timestamp_column]):
        frame[step.timestamp_column] = pd.to_datetime(frame[step.timestamp_column], utc=True)
    try:
        result = FeatureStore(ctx.home.path).get_historical_features(
            frame, step.features, timestamp_column=step.timestamp_column, full_feature_names=step.full_feature_names)
    except FeatureStoreError as exc:
        raise StepFailed(str(exc)) from None
    table = result if isinstance(result, pa.Table) else pa.Table.from_pandas(result, preserve_index=False)
    out = ctx.path(step.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if out.suffix == ".csv":
        table.to_pandas().to_csv(tmp, index=False)
    else:
        pq.write_table(table, tmp)
    os.replace(tmp, out)
    return Result({"path": step.out, "rows": table.num_rows}, [out], summary=f"{table.num_rows} rows -> {step.out}")


def _set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    node = config
    *parents, last = key.split(".")
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def _train(step: Train, ctx: Context) -> Result:
    from .train import load_config, train

    config = load_config(ctx.path(step.config))
    if step.dataset:
        config["dataset"] = step.dataset
    for key, value in step.set.items():
        _set_dotted(config, key, value)
    try:
        result = train(ctx.home, config)
    except RegistryError as exc:
        raise StepFailed(f"training failed: {exc}") from None
    failed = [t["name"] for t in result.behavioural if not t["passed"]]
    return Result({"run": result.run_id, "package": str(result.package_dir), "package_sha": result.package_sha,
                   "weights_sha256": result.weights_hash}, [result.package_dir],
                  {"metrics": result.metrics, "behavioural": result.behavioural},
                  f"run {result.run_id}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items()))
                  + (f"; behavioural tests failed: {', '.join(failed)}" if failed else ""))


# ---- evaluate --------------------------------------------------------------------------


def _scorer(path: Path) -> tuple[Callable[[Any], Any], dict[str, Any]]:
    """predict(encoded rows) for a package written by `vivace train`, and its metadata."""
    import numpy as np
    import torch

    from .package import load_package

    package = load_package(path)
    if package.platform != "torchscript" or not package.metadata.get("features"):
        raise StepFailed(f"{path}: evaluate takes packages written by `vivace train` (TorchScript with feature "
                         "metadata)")
    model = torch.jit.load(str(path / package.model_file), map_location="cpu")
    model.eval()

    def predict(x: Any) -> Any:
        with torch.no_grad():
            return model(torch.from_numpy(x)).numpy().reshape(-1).astype(np.float64)

    return predict, package.metadata


def _evaluate(step: Evaluate, ctx: Context) -> Result:
    from .data import open_dataset
    from .models import LOWER_IS_BETTER, get_version, resolve
    from .train import METRICS, compute_metrics, encode, normalize_config, run_behavioural_tests

    source = ctx.path(step.package)
    predict, meta = _scorer(source if source.is_dir() else resolve(ctx.home, step.package))
    task, target, specs = meta.get("task", "binary"), meta.get("target"), meta["features"]
    frame = open_dataset(step.data, ctx.home)
    if target not in frame:
        raise StepFailed(f"{step.data} has no target column {target!r}")
    y = frame[target].to_numpy(dtype="float64")
    names = list(METRICS[task])
    predictions = predict(encode(frame, specs))
    metrics = compute_metrics(task, names, y, predictions)
    checks: list[tuple[str, bool, str]] = []

    def better(metric: str, value: float, bound: float) -> bool:
        return value <= bound if metric in LOWER_IS_BETTER else value >= bound

    for metric, bound in step.thresholds.items():
        if metric not in metrics:
            checks.append((f"threshold {metric}", False, f"no metric {metric!r} for {task} (metrics: {names})"))
            continue
        op = "<=" if metric in LOWER_IS_BETTER else ">="
        checks.append((f"threshold {metric}", better(metric, metrics[metric], bound),
                       f"{metrics[metric]:.4f} (needs {op} {bound:g})"))
    holder_metrics = None
    if step.model:
        try:
            holder = get_version(ctx.home, f"{step.model}@{step.alias}")
        except NotFoundError:
            checks.append((f"vs {step.model}@{step.alias}", True, "no current holder to compare with"))
        else:
            # The holder encodes the rows with its own features (categories may differ).
            holder_predict, holder_meta = _scorer(resolve(ctx.home, holder.ref))
            holder_metrics = compute_metrics(task, names, y, holder_predict(encode(frame, holder_meta["features"])))
            metric = step.metric
            if metric not in metrics:
                raise StepFailed(f"evaluate: no metric {metric!r} for {task} (metrics: {names})")
            direction = step.direction or ("min" if metric in LOWER_IS_BETTER else "max")
            value, reference = metrics[metric], holder_metrics[metric]
            needed = reference + step.margin if direction == "max" else reference - step.margin
            ok = value >= needed if direction == "max" else value <= needed
            checks.append((f"{metric} vs {holder.ref} ({step.model}@{step.alias})", ok,
                           f"{value:.4f} vs {reference:.4f} on {step.data} (needs {'>=' if direction == 'max' else '<='}"
                           f" {needed:.4f})"))
    tests = step.behavioural_tests
    if tests is None and step.run:
        from .runs import get_run

        tests = normalize_config(get_run(ctx.home, step.run).config)["behavioural_tests"]
    behavioural = []
    if tests:
        sample = frame.iloc[:500].reset_index(drop=True)
        behavioural = run_behavioural_tests(tests, sample, specs, predict)
        for t in behavioural:
            checks.append((f"behavioural {t['name']}", bool(t["passed"]), t["detail"]))
    slices = []
    for s in step.slices:
        if s.feature not in frame:
            checks.append((f"slice {s.feature}", False, f"{step.data} has no column {s.feature!r}"))
            continue
        if s.metric not in names:
            checks.append((f"slice {s.feature}", False, f"no metric {s.metric!r} for {task} (metrics: {names})"))
            continue
        scores = frame.assign(_p=predictions)
        per_group = {}
        for value, group in scores.groupby(s.feature, observed=True):
            if len(group) >= s.min_rows:
                per_group[str(value)] = compute_metrics(task, [s.metric], group[target].to_numpy(dtype="float64"),
                                                        group["_p"].to_numpy())[s.metric]
        gap = max(per_group.values()) - min(per_group.values()) if len(per_group) > 1 else 0.0
        slices.append({"feature": s.feature, "metric": s.metric, "groups": per_group, "gap": gap})
        worst = min(per_group, key=lambda g: per_group[g]) if per_group else "-"
        checks.append((f"slice {s.feature} ({s.metric})", gap <= s.max_gap,
                       f"gap {gap:.4f} across {len(per_group)} groups (max {s.max_gap:g}; lowest: {worst})"))
    report = {"data": step.data, "metrics": metrics, "holder_metrics": holder_metrics, "slices": slices,
              "behavioural": behavioural, "checks": [{"check": c, "passed": ok, "detail": d} for c, ok, d in checks]}
    path = _write_json(ctx.step_dir / "report.json", report)
    failed = [c for c, ok, _ in checks if not ok]
    if failed:
        raise StepFailed(f"{len(failed)} of {len(checks)} evaluation checks failed: {', '.join(failed)}", checks)
    manifest = (source if source.is_dir() else resolve(ctx.home, step.package)) / "package.json"
    details = {"metrics": metrics, "checks": report["checks"], "package_sha256": hashlib.sha256(
        manifest.read_bytes()).hexdigest(), "holder": _holder(ctx.home, step.model, step.alias) if step.model else None}
    return Result({"report": str(path)}, [path], details,
                  ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())) + f"; {len(checks)} checks passed")


# ---- package, quantize -----------------------------------------------------------------


def _package(step: Package, ctx: Context) -> Result:
    out = ctx.path(step.out)
    _vivace(ctx, ["package", step.model, "--out", str(out), "--name", step.model_name, "--force", *step.args],
            "package")
    return Result({"package": step.out}, [out], summary=f"-> {step.out}")


def _quantize(step: Quantize, ctx: Context) -> Result:
    out = ctx.path(step.out)
    source = str(ctx.path(step.source)) if ctx.path(step.source).is_dir() else step.source
    args = ["quantize", source, "--out", str(out), "--force"]
    if step.int8:
        args.append("--int8")
    if step.calibration:
        args += ["--calibration", str(ctx.path(step.calibration))]
    if step.tolerance is not None:
        args += ["--tolerance", str(step.tolerance)]
    output = _vivace(ctx, args, "quantize")
    return Result({"package": step.out}, [out], summary=(output.strip().splitlines() or [""])[0])


# ---- integration test ------------------------------------------------------------------

_LISTENING = re.compile(r"serving .* on https?://[^:\s]+:(\d+)")


def _served_name(step: IntegrationTest, ctx: Context) -> str:
    if step.served_name:
        return step.served_name
    path = ctx.path(step.model)
    if path.is_dir():
        try:
            return str(json.loads((path / "package.json").read_text())["name"])
        except (OSError, ValueError, KeyError):
            raise StepFailed(f"{step.model}: not a model package (no readable package.json)") from None
    return step.model.split("@")[0].split("/")[0]


class _Server:
    """`vivace serve MODEL --host 127.0.0.1 --port 0` in a subprocess; its port read from its log."""

    def __init__(self, step: IntegrationTest, ctx: Context):
        self.log_path = ctx.step_dir / "serve.log"
        model = str(ctx.path(step.model)) if ctx.path(step.model).is_dir() else step.model
        args = ["serve", model, "--host", "127.0.0.1", "--port", "0", "--log-level", "INFO", *step.serve_args]
        if step.served_name:
            args += ["--model-name", step.served_name]
        ctx.log(f"    $ vivace {' '.join(args)}")
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "vivace", "--home", str(ctx.home.path), *args],
                                     cwd=ctx.pipeline.workdir, stdout=self.log, stderr=subprocess.STDOUT,
                                     preexec_fn=_die_with_parent, env=_child_env())
        deadline = time.monotonic() + step.startup_timeout_s
        self.port = 0
        while not self.port:
            match = _LISTENING.search(self.log_path.read_text())
            if match:
                self.port = int(match.group(1))
            elif self.proc.poll() is not None:
                self.stop()
                raise StepFailed(f"`vivace serve` exited with status {self.proc.returncode}: {self.tail()}")
            elif time.monotonic() > deadline:
                self.stop()
                raise StepFailed(f"`vivace serve` did not listen within {step.startup_timeout_s:g}s: {self.tail()}")
            else:
                time.sleep(0.05)

    def tail(self) -> str:
        return "\n".join(self.log_path.read_text().strip().splitlines()[-5:])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _check_outputs(expect: Any, body: Any) -> list[tuple[str, bool, str]]:
    checks = []
    outputs = {o.get("name"): o for o in body.get("outputs", [])} if isinstance(body, dict) else {}
    for name, want in expect.outputs.items():
        got = outputs.get(name)
        if got is None:
            checks.append((f"output {name}", False, f"missing from the response (outputs: {sorted(outputs)})"))
            continue
        data = got.get("data", [])
        flat = [v for v in _flat(data)]
        problems = []
        if want.datatype is not None and got.get("datatype") != want.datatype:
            problems.append(f"datatype {got.get('datatype')} != {want.datatype}")
        if want.shape is not None and list(got.get("shape", [])) != want.shape:
            problems.append(f"shape {got.get('shape')} != {want.shape}")
        numbers = [v for v in flat if isinstance(v, (int, float))]
        if want.min is not None and (not numbers or min(numbers) < want.min):
            problems.append(f"values {_short(flat)} below min {want.min:g}")
        if want.max is not None and (not numbers or max(numbers) > want.max):
            problems.append(f"values {_short(flat)} above max {want.max:g}")
        if want.equals is not None and flat != list(_flat(want.equals)):
            problems.append(f"values {_short(flat)} != {_short(want.equals)}")
        if want.close_to is not None:
            target = list(_flat(want.close_to))
            if len(target) != len(numbers) or any(abs(a - b) > want.tolerance for a, b in zip(numbers, target)):
                problems.append(f"values {_short(flat)} not within {want.tolerance:g} of {_short(target)}")
        checks.append((f"output {name}", not problems, "; ".join(problems) or f"ok: {_short(flat)}"))
    return checks


def _flat(data: Any) -> Any:
    if isinstance(data, list):
        for item in data:
            yield from _flat(item)
    else:
        yield data


def _short(values: Any) -> str:
    values = list(_flat(values))
    text = json.dumps(values[:6], default=str)
    return text if len(values) <= 6 else text[:-1] + f", ... ({len(values)} values)]"


def _percentile(sorted_ms: list[float], q: float) -> float:
    index = min(len(sorted_ms) - 1, max(0, int(round(q / 100 * len(sorted_ms) + 0.5)) - 1))
    return sorted_ms[index]


def _integration_test(step: IntegrationTest, ctx: Context) -> Result:
    served = _served_name(step, ctx)
    server = _Server(step, ctx)
    checks: list[tuple[str, bool, str]] = []
    results = []
    try:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        for request in step.requests:
            model = request.model or served
            target = f"/v2/models/{model}/infer"
            payload = json.dumps(request.body).encode()
            times, statuses, first = [], [], None
            for i in range(step.warmup + request.repeat):
                start = time.perf_counter()
                conn.request("POST", target, payload, {"Content-Type": "application/json"})
                response = conn.getresponse()
                data = response.read()
                elapsed = (time.perf_counter() - start) * 1000
                if i < step.warmup:
                    continue
                times.append(elapsed)
                statuses.append(response.status)
                if first is None:
                    try:
                        first = json.loads(data)
                    except ValueError:
                        first = {"raw": data[:500].decode(errors="replace")}
            label = f"request {request.name!r}"
            wrong = [s for s in statuses if s != request.expect.status]
            checks.append((f"{label} status", not wrong,
                           f"{len(wrong)} of {len(statuses)} answered {sorted(set(wrong))}, expected "
                           f"{request.expect.status}: {json.dumps(first)[:300]}" if wrong
                           else f"{request.expect.status} x{len(statuses)}"))
            if not wrong:
                checks += [(f"{label} {c}", ok, d) for c, ok, d in _check_outputs(request.expect, first)]
            ordered = sorted(times)
            stats = {"p50_ms": _percentile(ordered, 50), "p99_ms": _percentile(ordered, 99), "max_ms": ordered[-1]}
            if request.latency is not None:
                for key, budget in msgspec.structs.asdict(request.latency).items():
                    if budget is not None:
                        checks.append((f"{label} latency {key[:-3]}", stats[key] <= budget,
                                       f"{stats[key]:.2f} ms over {len(times)} requests (budget {budget:g} ms)"))
            results.append({"name": request.name, "model": model, "repeat": request.repeat, "latency_ms": stats,
                            "statuses": sorted(set(statuses)), "response": first})
        conn.close()
    except (OSError, http.client.HTTPException) as exc:
        checks.append(("connection", False, f"{type(exc).__name__}: {exc}; server log: {server.tail()}"))
    finally:
        server.stop()
    report = {"model": step.model, "served_name": served, "requests": results,
              "checks": [{"check": c, "passed": ok, "detail": d} for c, ok, d in checks]}
    path = _write_json(ctx.step_dir / "report.json", report)
    failed = [c for c, ok, _ in checks if not ok]
    if failed:
        raise StepFailed(f"{len(failed)} of {len(checks)} checks against the live endpoint failed: {', '.join(failed)}",
                         checks)
    return Result({"report": str(path)}, [path], {"checks": report["checks"],
                                                  "latency_ms": {r["name"]: r["latency_ms"] for r in results}},
                  f"{len(checks)} checks passed on {len(step.requests)} requests")


# ---- register, promote, shell ----------------------------------------------------------


def _register(step: Register, ctx: Context) -> Result:
    from .models import list_versions, register_model

    package = ctx.path(step.package)
    manifest = package / "package.json"
    if not manifest.is_file():
        raise StepFailed(f"{step.package}: not a model package (no package.json)")
    package_sha = hashlib.sha256(manifest.read_bytes()).hexdigest()
    # Once per package and run: a step redone after a crash finds the version it registered.
    try:
        existing = [v for v in list_versions(ctx.home, step.model)
                    if v.package_sha == package_sha and (step.run is None or v.run_id == step.run)]
    except NotFoundError:
        existing = []
    if existing:
        version = existing[-1]
        note = " (already registered)"
    else:
        tags = {**step.tags, "pipeline": ctx.pipeline.name, "pipeline_run": ctx.run_id}
        version = register_model(ctx.home, package, step.model, run_id=step.run, description=step.description,
                                 tags=tags)
        note = ""
    return Result({"model": version.name, "version": version.version, "ref": version.ref},
                  details={"package_sha256": package_sha}, summary=f"{version.ref}{note}")


def _promote(step: Promote, ctx: Context) -> Result:
    from .models import LOWER_IS_BETTER, PromotionRefused, ProtectedAlias, gate_checks, get_version, promote

    outputs = {"model": step.model, "alias": step.alias, "version": step.version}
    try:
        holder = get_version(ctx.home, f"{step.model}@{step.alias}")
    except NotFoundError:
        holder = None
    if holder is not None and holder.version == step.version:
        return Result(outputs, summary=f"{step.model}@{step.alias} already at version {step.version}")
    reason = f"pipeline {ctx.pipeline.name} run {ctx.run_id}"
    if step.approval:
        from .approvals import list_requests, request_promotion

        candidate = get_version(ctx.home, f"{step.model}/{step.version}")
        direction = step.direction or ("min" if step.metric in LOWER_IS_BETTER else "max")
        checks = gate_checks(candidate, holder, step.metric, direction, step.margin)
        if not all(ok for _, ok, _ in checks):
            raise StepFailed(f"promotion of {candidate.ref} to @{step.alias} would be refused by the gate", checks)
        mine = [r for r in list_requests(ctx.home, state=None)
                if (r.name, r.version, r.alias) == (step.model, step.version, step.alias)]
        if mine and mine[-1].state == "approved":
            return Result(outputs, details={"request": mine[-1].id}, summary=f"approved by {mine[-1].decider}")
        if mine and mine[-1].state == "rejected":
            raise StepFailed(f"promotion request {mine[-1].id} was rejected by {mine[-1].decider}")
        request = mine[-1] if mine else request_promotion(ctx.home, step.model, step.version, step.alias, reason)
        raise AwaitingApproval(f"promotion request {request.id} ({step.model}/{step.version} -> @{step.alias}) waits "
                               f"for approval: another identity runs `vivace models approve {request.id}`, then run "
                               "the pipeline again")
    try:
        checks, previous = promote(ctx.home, step.model, step.version, step.alias, metric=step.metric,
                                   direction=step.direction, margin=step.margin, reason=reason)
    except PromotionRefused as exc:
        raise StepFailed(f"the promotion gate refused {step.model}/{step.version} for @{step.alias}; the alias stays",
                         exc.checks) from None
    except ProtectedAlias as exc:
        raise StepFailed(f"{exc} (or set approval: true on the step)") from None
    was = f", was version {previous}" if previous is not None else ""
    return Result(outputs, details={"checks": [{"check": c, "passed": ok, "detail": d} for c, ok, d in checks]},
                  summary=f"{step.model}@{step.alias} -> version {step.version}{was}")


def _shell(step: Shell, ctx: Context) -> Result:
    env = _child_env({**os.environ, "VIVACE_HOME": str(ctx.home.path), **step.env})
    ctx.log(f"    $ {step.run}")
    try:
        proc = subprocess.run(["/bin/sh", "-c", step.run], cwd=ctx.pipeline.workdir, env=env, timeout=step.timeout_s,
                              preexec_fn=_die_with_parent)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"command ran past its timeout of {step.timeout_s:g}s") from None
    if proc.returncode != 0:
        raise StepFailed(f"command exited with status {proc.returncode}")
    missing = [f"{key} ({path})" for key, path in step.outputs.items() if not ctx.path(path).exists()]
    if missing:
        raise StepFailed(f"declared outputs were not written: {', '.join(missing)}")
    return Result(dict(step.outputs), [ctx.path(p) for p in step.outputs.values()],
                  summary=", ".join(step.outputs.values()))


_IMPLEMENTATIONS: dict[str, Callable[[Any, Context], Result]] = {
    "data.validate": _data_validate, "features.historical": _features_historical, "train": _train,
    "evaluate": _evaluate, "package": _package, "quantize": _quantize, "integration_test": _integration_test,
    "register": _register, "promote": _promote, "shell": _shell,
}
