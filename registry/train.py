"""`vivace train CONFIG.yaml`: reproducible training of a tabular MLP into a model package.

The config names a dataset version (or a feature-store training set: features joined
point-in-time onto an entity dataset version), a target, an MLP spec, hyperparameters, a
seed, a validation split, metrics and behavioural tests (see
registry/data/churn_train.yaml).
Same config + same data -> same metrics and same weights hash: seeds are fixed, torch
runs deterministic algorithms on one thread, and batches are drawn from a seeded
generator.

The packaged TorchScript model takes raw feature columns as one FP32 tensor
``input__0 [-1, F]`` in the order of ``metadata.features``; a categorical column is sent
as the index of its value in that feature's ``categories`` (-1 or any other index for
an unseen value). Standardisation, NaN filling and one-hot encoding happen inside the
model, so a server needs nothing but the package. ``output__0 [-1, 1]`` is the
probability of the positive class (binary) or the prediction (regression).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import get_dataset, numeric_lookalikes, open_dataset
from .models import _store_package
from .package import write_package
from .profile import build_profile
from .runs import finish_run, start_run
from .store import Home, RegistryError, open_home

ACTIVATIONS = ("relu", "tanh", "gelu", "sigmoid", "silu")
METRICS = {"binary": ("accuracy", "auc", "logloss"), "regression": ("rmse", "mae")}
_TOP_KEYS = {"name", "intended_use", "dataset", "training_set", "target", "task", "features", "drop", "categorical",
             "model", "train", "seed", "split", "metrics", "behavioural_tests", "sensitive"}
_TRAINING_SET_KEYS = {"entities", "features", "timestamp_column", "full_feature_names"}


@dataclass
class TrainResult:
    run_id: str
    package_dir: Path
    package_sha: str
    metrics: dict[str, float]
    weights_hash: str
    behavioural: list[dict[str, Any]]


# ---- config --------------------------------------------------------------------------


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RegistryError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise RegistryError(f"config {path}: invalid YAML: {exc}") from None
    if not isinstance(config, dict):
        raise RegistryError(f"config {path}: must be a mapping")
    return config


def normalize_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults and check types; RegistryError names the offending key."""
    unknown = set(config) - _TOP_KEYS
    if unknown:
        raise RegistryError(f"config: unknown keys {sorted(unknown)}")
    if not isinstance(config.get("target"), str):
        raise RegistryError("config: 'target' is required (a string)")
    training_set = config.get("training_set")
    if training_set is None:
        if not isinstance(config.get("dataset"), str):
            raise RegistryError("config: 'dataset' (name@version) or 'training_set' is required")
    elif (not isinstance(training_set, dict) or set(training_set) - _TRAINING_SET_KEYS
          or not isinstance(training_set.get("entities"), str) or not training_set.get("features")):
        raise RegistryError("config: training_set needs 'entities' (a dataset name@version) and 'features'"
                            f" (a feature service or 'view:feature' list); keys allowed: {sorted(_TRAINING_SET_KEYS)}")
    task = config.get("task", "binary")
    if task not in METRICS:
        raise RegistryError(f"config: task must be one of {sorted(METRICS)}, got {task!r}")
    model = {"hidden": [32, 16], "activation": "relu", "dropout": 0.0, **(config.get("model") or {})}
    if not (isinstance(model["hidden"], list) and all(isinstance(h, int) and h > 0 for h in model["hidden"])):
        raise RegistryError("config: model.hidden must be a list of positive layer sizes")
    if model["activation"] not in ACTIVATIONS:
        raise RegistryError(f"config: model.activation must be one of {ACTIVATIONS}")
    train = {"epochs": 10, "batch_size": 128, "learning_rate": 0.005, "optimizer": "adam", "weight_decay": 0.0,
             **(config.get("train") or {})}
    if train["optimizer"] not in ("adam", "sgd"):
        raise RegistryError("config: train.optimizer must be adam or sgd")
    for key in ("epochs", "batch_size"):
        if not isinstance(train[key], int) or train[key] < 1:
            raise RegistryError(f"config: train.{key} must be a positive integer")
    split = {"validation": 0.2, **(config.get("split") or {})}
    if not 0 < split["validation"] < 1:
        raise RegistryError("config: split.validation must be a fraction between 0 and 1")
    metrics = config.get("metrics") or list(METRICS[task])
    bad = [m for m in metrics if m not in METRICS[task]]
    if bad:
        raise RegistryError(f"config: metrics {bad} are not available for {task} (choose from {METRICS[task]})")
    seed = config.get("seed", 0)
    if not isinstance(seed, int):
        raise RegistryError("config: seed must be an integer")
    tests = config.get("behavioural_tests") or []
    for i, test in enumerate(tests):
        if not isinstance(test, dict) or test.get("type") not in ("invariance", "directional") or "feature" not in test:
            raise RegistryError(f"config: behavioural_tests[{i}] needs type (invariance|directional) and feature")
        if test["type"] == "invariance" and not ({"set", "add"} & set(test)):
            raise RegistryError(f"config: behavioural_tests[{i}] (invariance) needs 'set' or 'add'")
        if test["type"] == "directional" and test.get("expect") not in ("increase", "decrease"):
            raise RegistryError(f"config: behavioural_tests[{i}] (directional) needs expect: increase|decrease")
    sensitive = config.get("sensitive") or []
    if not isinstance(sensitive, list) or not all(isinstance(c, str) for c in sensitive):
        raise RegistryError("config: sensitive must be a list of column names (attributes to compute group "
                            "metrics for: demographic parity, equal opportunity, per-group error rates)")
    return {**config, "name": config.get("name") or config["target"] + "-model", "task": task, "model": model,
            "sensitive": list(sensitive),
            "train": train, "split": split, "metrics": list(metrics), "seed": seed, "behavioural_tests": tests,
            "drop": list(config.get("drop") or [])}


# ---- training data -------------------------------------------------------------------


@dataclass
class TrainingData:
    frame: Any                    # pandas DataFrame
    datasets: list[str]           # dataset versions read ("name@vN")
    feature_views: list[str]      # feature views joined in, if any
    not_features: list[str]       # entity keys and timestamps: never model inputs


def load_training_data(home: Home, config: dict[str, Any]) -> TrainingData:
    """The rows to train on: a dataset version, or a point-in-time training set.

    A training set joins feature-store features onto an entity dataset version (keys,
    event timestamps and the target) with `FeatureStore.get_historical_features`.
    """
    spec = config.get("training_set")
    if spec is None:
        dataset = get_dataset(home, config["dataset"])
        return TrainingData(open_dataset(dataset.ref, home), [dataset.ref], [], [])
    from vivace.features import FeatureStore, FeatureStoreError

    entities = get_dataset(home, spec["entities"])
    timestamp_column = spec.get("timestamp_column", "event_timestamp")
    store = FeatureStore(home.path)
    features = spec["features"]
    try:
        refs = store.get_feature_service(features).features if isinstance(features, str) else list(features)
        views = sorted({ref.split(":", 1)[0] for ref in refs})
        join_keys = sorted({store.get_entity(store.get_feature_view(v).entity).join_key for v in views})
        frame = store.get_historical_features(
            open_dataset(entities.ref, home), features, timestamp_column=timestamp_column,
            full_feature_names=bool(spec.get("full_feature_names", False)))
    except FeatureStoreError as exc:
        raise RegistryError(f"training set: {exc}") from None
    return TrainingData(frame, [entities.ref], views, [timestamp_column, *join_keys])


# ---- encoding ------------------------------------------------------------------------


# An undeclared text column with more distinct values than this is refused: one-hot
# encoding it is rarely what was meant (an id, free text, a numeric column read as text).
MAX_CATEGORIES = 100


def feature_specs(
    frame: Any, config: dict[str, Any], not_features: list[str] = (), source: str = "the training data",
) -> list[dict[str, Any]]:
    """The model's input columns in order: numeric ones, or categorical with their values."""
    from pandas.api import types as t

    target = config["target"]
    excluded = {target, *config["drop"], *not_features}
    names = config.get("features") or [c for c in frame.columns if c not in excluded]
    missing = [c for c in [*names, target] if c not in frame.columns]
    if missing:
        raise RegistryError(f"columns {missing} are not in {source} (columns: {[str(c) for c in frame.columns]})")
    declared = set(config.get("categorical") or [])
    lookalikes = numeric_lookalikes(frame[[n for n in names if n not in declared]])
    specs = []
    for name in names:
        col = frame[name]
        if name in declared or not (t.is_numeric_dtype(col) or t.is_bool_dtype(col)):
            categories = sorted(col.dropna().astype(str).unique().tolist())
            if name in lookalikes:
                bad = lookalikes[name]
                raise RegistryError(
                    f"column {name!r} in {source} is numeric but for {len(bad)} value(s) that are not numbers, "
                    f"e.g. {bad[:5]}: clean them, or list the column under `categorical:` to one-hot it")
            if name not in declared and len(categories) > MAX_CATEGORIES:
                raise RegistryError(
                    f"column {name!r} in {source} is text with {len(categories)} distinct values (more than "
                    f"{MAX_CATEGORIES}): list it under `categorical:` to one-hot it anyway, or `drop:` it")
            specs.append({"name": str(name), "kind": "categorical", "categories": categories})
        else:
            specs.append({"name": str(name), "kind": "numeric"})
    return specs


def encode(frame: Any, specs: list[dict[str, Any]]) -> np.ndarray:
    """Raw rows -> the FP32 matrix the packaged model takes (categories as indexes, -1 unseen)."""
    import pandas as pd

    out = np.empty((len(frame), len(specs)), dtype="float32")
    for j, spec in enumerate(specs):
        col = frame[spec["name"]]
        if spec["kind"] == "numeric":
            out[:, j] = pd.to_numeric(col, errors="coerce").to_numpy(dtype="float32", na_value=np.nan)
        else:
            codes = pd.Categorical(col.astype("string"), categories=spec["categories"]).codes
            out[:, j] = codes.astype("float32")
    return out


def _build_model(
    specs: list[dict[str, Any]], x_train: np.ndarray, config: dict[str, Any], y_scale: tuple[float, float],
) -> Any:
    """The TorchScript-traceable model: preprocessing buffers plus the MLP."""
    import torch
    from torch import nn

    numeric = [j for j, s in enumerate(specs) if s["kind"] == "numeric"]
    categorical = [(j, len(s["categories"])) for j, s in enumerate(specs) if s["kind"] == "categorical"]
    mean = np.nanmean(x_train[:, numeric], axis=0) if numeric else np.zeros(0)
    std = np.nanstd(x_train[:, numeric], axis=0) if numeric else np.zeros(0)
    mean = np.nan_to_num(mean)
    std = np.where(np.nan_to_num(std) > 1e-12, np.nan_to_num(std), 1.0)
    activation = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU, "sigmoid": nn.Sigmoid, "silu": nn.SiLU}[
        config["model"]["activation"]]

    class TabularMLP(nn.Module):
        """Standardise numeric columns (NaN -> mean), one-hot categorical ones, then an MLP."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("numeric_index", torch.tensor(numeric, dtype=torch.long))
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
            self.categorical = [(j, k) for j, k in categorical]
            for i, (_, k) in enumerate(categorical):
                self.register_buffer(f"cat_values_{i}", torch.arange(k, dtype=torch.float32))
            self.binary = config["task"] == "binary"
            self.y_mean, self.y_std = y_scale
            width = len(numeric) + sum(k for _, k in categorical)
            layers: list[nn.Module] = []
            for hidden in config["model"]["hidden"]:
                layers += [nn.Linear(width, hidden), activation()]
                if config["model"]["dropout"]:
                    layers.append(nn.Dropout(config["model"]["dropout"]))
                width = hidden
            layers.append(nn.Linear(width, 1))
            self.net = nn.Sequential(*layers)

        def logits(self, x: torch.Tensor) -> torch.Tensor:
            parts = []
            if len(numeric):
                num = x.index_select(1, self.numeric_index)
                num = torch.where(torch.isnan(num), self.mean.expand_as(num), num)
                parts.append((num - self.mean) / self.std)
            for i, (j, _) in enumerate(self.categorical):
                parts.append((x[:, j:j + 1] == getattr(self, f"cat_values_{i}")).to(x.dtype))
            return self.net(torch.cat(parts, dim=1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.logits(x)
            return torch.sigmoid(z) if self.binary else z * self.y_std + self.y_mean

    return TabularMLP()


# ---- metrics -------------------------------------------------------------------------


def compute_metrics(task: str, names: list[str], y: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from vivace.monitor.quality import auc  # one AUC for training and for production labels

    out: dict[str, float] = {}
    for name in names:
        if name == "accuracy":
            out[name] = float(((pred >= 0.5).astype(int) == y).mean())
        elif name == "auc":
            out[name] = auc(y, pred)
        elif name == "logloss":
            p = np.clip(pred, 1e-7, 1 - 1e-7)
            out[name] = float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())
        elif name == "rmse":
            out[name] = float(np.sqrt(((pred - y) ** 2).mean()))
        elif name == "mae":
            out[name] = float(np.abs(pred - y).mean())
    return out


def weights_hash(model: Any) -> str:
    """SHA-256 over the state dict (names, dtypes, shapes and bytes, in key order)."""
    h = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        array = tensor.detach().cpu().contiguous().numpy()
        h.update(f"{key}:{array.dtype}:{array.shape};".encode())
        h.update(array.tobytes())
    return h.hexdigest()


# ---- behavioural tests ---------------------------------------------------------------


def run_behavioural_tests(
    tests: list[dict[str, Any]], frame: Any, specs: list[dict[str, Any]], predict: Any,
) -> list[dict[str, Any]]:
    """Evaluate invariance and directional tests on `frame` (raw validation rows)."""
    results = []
    base = predict(encode(frame, specs))
    kinds = {s["name"]: s["kind"] for s in specs}
    for i, test in enumerate(tests):
        feature, kind = test["feature"], test["type"]
        name = test.get("name") or f"{kind}-{feature}-{i}"
        if feature not in kinds:
            results.append({"name": name, "type": kind, "feature": feature, "passed": False,
                            "detail": f"feature {feature!r} is not a model input"})
            continue
        perturbed = frame.copy()
        if kind == "invariance":
            if "set" in test:
                perturbed[feature] = test["set"]
            elif kinds[feature] == "numeric":
                perturbed[feature] = perturbed[feature].astype("float64") + float(test["add"])
            else:
                results.append({"name": name, "type": kind, "feature": feature, "passed": False,
                                "detail": "'add' needs a numeric feature"})
                continue
            delta = np.abs(predict(encode(perturbed, specs)) - base)
            tolerance = float(test.get("tolerance", 0.05))
            worst = float(delta.max()) if len(delta) else 0.0
            results.append({"name": name, "type": kind, "feature": feature, "passed": worst <= tolerance,
                            "detail": f"max |Δprediction| {worst:.4g} (tolerance {tolerance:g})",
                            "max_delta": worst})
        else:
            if kinds[feature] != "numeric":
                results.append({"name": name, "type": kind, "feature": feature, "passed": False,
                                "detail": "directional tests need a numeric feature"})
                continue
            step = float(test.get("delta", 1.0))
            perturbed[feature] = perturbed[feature].astype("float64") + step
            change = predict(encode(perturbed, specs)) - base
            sign = 1.0 if test["expect"] == "increase" else -1.0
            fraction = float((sign * change > 0).mean()) if len(change) else 0.0
            needed = float(test.get("min_fraction", 0.9))
            results.append({"name": name, "type": kind, "feature": feature, "passed": fraction >= needed,
                            "detail": f"{fraction:.1%} of rows {test['expect']} when {feature} += {step:g}"
                                      f" (needs {needed:.0%}); mean Δ {float(change.mean()):+.4g}",
                            "fraction": fraction})
    return results


# ---- importance and group metrics ----------------------------------------------------

IMPORTANCE_ROWS = 2000  # validation rows permuted (the first ones: the split is already random)


def _importance_and_fairness(config: dict[str, Any], val_frame: Any, specs: list[dict[str, Any]], x_val: np.ndarray,
                             y_val: np.ndarray, val_pred: np.ndarray, predict: Any) -> tuple[dict[str, Any], Any]:
    """Training-time permutation importance on the validation set (the method production
    importance uses, monitor/quality.py), and group metrics of the `sensitive` columns."""
    from vivace.monitor.quality import clean_json, group_metrics, permutation_importance

    n = min(len(x_val), IMPORTANCE_ROWS)
    importance = permutation_importance(predict, x_val[:n], [s["name"] for s in specs], y_val[:n], config["task"],
                                        repeats=3, seed=config["seed"])
    importance["split"] = "validation"
    fairness = {}
    for column in config["sensitive"]:
        if column not in val_frame.columns:
            raise RegistryError(f"sensitive column {column!r} is not in the training data "
                                f"(columns: {[str(c) for c in val_frame.columns]})")
        values = val_frame[column]
        groups = [None if v is None or (isinstance(v, float) and v != v) else str(v) for v in values.tolist()]
        fairness[column] = group_metrics(config["task"], y_val, val_pred, groups)
    return clean_json(importance), clean_json(fairness)


# ---- training ------------------------------------------------------------------------


def _params(config: dict[str, Any]) -> dict[str, Any]:
    """The run parameters that shape the result (defaults filled in once normalized)."""
    return {k: config.get(k) for k in ("task", "model", "train", "seed", "split", "features", "drop")}


def train(
    home: Home | str | os.PathLike | None,
    config: dict[str, Any] | str | os.PathLike,
    output: str | os.PathLike | None = None,
) -> TrainResult:
    """Train per `config` (a dict or a YAML path), record the run, write the model package.

    The run is recorded as 'running' first; any error marks it 'failed' with the error
    and is re-raised.
    """
    home = open_home(home)
    raw = load_config(config) if isinstance(config, (str, os.PathLike)) else dict(config)
    run_id = start_run(home, str(raw.get("name") or raw.get("target") or "run"), raw, _params(raw))
    try:
        result = _train(home, run_id, raw, output)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
        finish_run(home, run_id, "failed", error=error if isinstance(exc, RegistryError)
                   else error + "\n" + traceback.format_exc(limit=5))
        raise
    return result


def _train(home: Home, run_id: str, raw: dict[str, Any], output: str | os.PathLike | None) -> TrainResult:
    import torch

    config = normalize_config(raw)
    data = load_training_data(home, config)
    frame = data.frame
    specs = feature_specs(frame, config, data.not_features, "dataset " + ", ".join(data.datasets))
    target = frame[config["target"]]
    if target.isna().any():
        raise RegistryError(f"target column {config['target']!r} has null values")
    y_all = target.to_numpy(dtype="float64")
    if config["task"] == "binary" and not set(np.unique(y_all)) <= {0.0, 1.0}:
        raise RegistryError(f"binary target {config['target']!r} must hold only 0 and 1")
    x_all = encode(frame, specs)

    rng = np.random.default_rng(config["seed"])
    order = rng.permutation(len(frame))
    n_val = max(1, int(round(len(frame) * config["split"]["validation"])))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    if len(train_idx) < 2:
        raise RegistryError(f"{len(frame)} rows leave {len(train_idx)} for training after the validation split")
    x_train, y_train, x_val, y_val = x_all[train_idx], y_all[train_idx], x_all[val_idx], y_all[val_idx]
    y_scale = (0.0, 1.0) if config["task"] == "binary" else (float(y_train.mean()), float(y_train.std() or 1.0))

    saved = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(config["seed"])
        model = _build_model(specs, x_train, config, y_scale)
        hp = config["train"]
        optimizer_cls = torch.optim.Adam if hp["optimizer"] == "adam" else torch.optim.SGD
        optimizer = optimizer_cls(model.parameters(), lr=hp["learning_rate"], weight_decay=hp["weight_decay"])
        loss_fn = torch.nn.BCEWithLogitsLoss() if config["task"] == "binary" else torch.nn.MSELoss()
        xt = torch.from_numpy(x_train)
        yt = torch.from_numpy(((y_train - y_scale[0]) / y_scale[1]).astype("float32")).reshape(-1, 1)
        generator = torch.Generator().manual_seed(config["seed"])

        def predict(x: np.ndarray) -> np.ndarray:
            model.eval()
            with torch.no_grad():
                return model(torch.from_numpy(x)).numpy().reshape(-1).astype("float64")

        epochs = []
        for epoch in range(1, hp["epochs"] + 1):
            model.train()
            permutation = torch.randperm(len(xt), generator=generator)
            total = 0.0
            for start in range(0, len(xt), hp["batch_size"]):
                batch = permutation[start:start + hp["batch_size"]]
                optimizer.zero_grad()
                loss = loss_fn(model.logits(xt[batch]), yt[batch])
                loss.backward()
                optimizer.step()
                total += loss.item() * len(batch)
            record = {"epoch": epoch, "train_loss": total / len(xt)}
            record.update(compute_metrics(config["task"], config["metrics"], y_val, predict(x_val)))
            epochs.append(record)
        val_pred = predict(x_val)
        metrics = compute_metrics(config["task"], config["metrics"], y_val, val_pred)
        importance, fairness = _importance_and_fairness(config, frame.iloc[val_idx], specs, x_val, y_val, val_pred,
                                                        predict)
        digest = weights_hash(model)
        val_frame = frame.iloc[val_idx[:500]].reset_index(drop=True)
        behavioural = run_behavioural_tests(config["behavioural_tests"], val_frame, specs, predict)
        train_frame = frame.iloc[train_idx][[s["name"] for s in specs]]
        profile = build_profile(train_frame, [s["name"] for s in specs if s["kind"] == "categorical"],
                                predict(x_train))
        model.eval()
        model.requires_grad_(False)  # an inference artifact: outputs need no autograd graph
        traced = torch.jit.trace(model, torch.from_numpy(x_val[:2]))
        buffer = io.BytesIO()
        torch.jit.save(traced, buffer)
    finally:
        torch.set_num_threads(saved[0])
        torch.use_deterministic_algorithms(saved[1])

    manifest = {
        "name": config["name"], "version": "1", "platform": "torchscript", "model_file": "model.pt",
        "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, len(specs)]}],
        "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}],
        "max_batch_size": 128,
        "parameters": {"torch_num_threads": 1},
        "metadata": {"run_id": run_id, "task": config["task"], "target": config["target"],
                     "datasets": data.datasets, "feature_views": data.feature_views,
                     "features": specs, "profile": "profile.json",
                     "weights_sha256": digest, "metrics": metrics, "importance": importance,
                     **({"sensitive": config["sensitive"], "fairness": fairness} if config["sensitive"] else {})},
    }
    package_dir = Path(output) if output else home.path / "runs" / run_id / "package"
    write_package(package_dir, manifest, {
        "model.pt": buffer.getvalue(),
        "profile.json": json.dumps(profile, indent=1).encode(),
    }, overwrite=(package_dir / "package.json").is_file())  # replace an earlier package only
    package_sha = _store_package(home, package_dir)
    finish_run(home, run_id, "finished", params=_params(config), metrics=metrics, epochs=epochs,
               behavioural=behavioural, datasets=data.datasets, feature_views=data.feature_views,
               package_sha=package_sha, weights_hash=digest)
    return TrainResult(run_id, package_dir, package_sha, metrics, digest, behavioural)
