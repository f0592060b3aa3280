"""Synthetic customer-churn data for `vivace demo`, tutorials and tests.

Deterministic for a given seed. The churn probability rises with support calls and
monthly charges, falls with tenure and longer contracts, and ignores `region` — so a
trained model should pass an invariance test on region and directional tests on tenure
and support calls.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from .store import Home

DATA_DIR = Path(__file__).with_name("data")
TRAIN_CONFIG = DATA_DIR / "churn_train.yaml"
SCHEMA = DATA_DIR / "churn_schema.yaml"

CONTRACTS = ["month-to-month", "one-year", "two-year"]
PLANS = ["basic", "standard", "premium"]
REGIONS = ["north", "south", "east", "west"]


def churn_frame(rows: int = 5000, seed: int = 7) -> pd.DataFrame:
    """A customer-churn table with numeric and categorical columns and a binary `churned`."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    tenure = rng.integers(0, 73, rows)
    contract = rng.choice(CONTRACTS, rows, p=[0.55, 0.25, 0.20])
    plan = rng.choice(PLANS, rows, p=[0.4, 0.4, 0.2])
    plan_price = np.select([plan == "basic", plan == "standard"], [25.0, 55.0], 85.0)
    monthly = np.round(plan_price + rng.normal(0, 8, rows).clip(-20, 20), 2)
    support_calls = rng.poisson(1.5, rows)
    contract_effect = np.select([contract == "month-to-month", contract == "one-year"], [1.0, -0.3], -1.2)
    logit = -1.0 - 0.045 * tenure + 0.025 * (monthly - 50) + 0.55 * support_calls + contract_effect
    churned = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype("int64")
    return pd.DataFrame({
        "customer_id": np.arange(100_000, 100_000 + rows, dtype="int64"),
        "tenure_months": tenure.astype("int64"),
        "monthly_charges": monthly.astype("float64"),
        "support_calls": support_calls.astype("int64"),
        "contract": contract,
        "plan": plan,
        "region": rng.choice(REGIONS, rows),
        "churned": churned,
    })


def write_churn_data(path: str | os.PathLike, rows: int = 5000, seed: int = 7) -> Path:
    """Write the churn table to `path` (.parquet or .csv) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    df = churn_frame(rows, seed)
    if path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        df.to_parquet(path, index=False)
    return path


def run_lifecycle(
    home: Home | str | os.PathLike | None, workdir: str | os.PathLike, name: str = "churn",
    alias: str = "production", log: Callable[[str], None] = print,
) -> str:
    """The registry half of `vivace demo`: version the data, train, register, promote.

    Returns the reference to serve (``churn@production``). Each step logs the command a
    user would type for it.
    """
    from .data import add_dataset
    from .models import promote, register_model
    from .store import open_home
    from .train import load_config, train

    home = open_home(home)
    data = write_churn_data(Path(workdir) / "churn.parquet")
    version, _ = add_dataset(home, name, data, SCHEMA)
    log(f"$ vivace data add {name} {data} --schema {SCHEMA}\n  -> {version.ref}, {version.row_count} rows")
    config = load_config(TRAIN_CONFIG)
    config["dataset"] = version.ref
    config["sensitive"] = ["region"]  # group metrics: region must not matter (see churn_frame)
    result = train(home, config)
    log(f"$ vivace train {TRAIN_CONFIG}   (its config plus sensitive: [region])\n  -> run {result.run_id}: "
        + ", ".join(f"{k}={v:.4f}" for k, v in sorted(result.metrics.items()))
        + f"; behavioural tests {sum(t['passed'] for t in result.behavioural)}/{len(result.behavioural)} passed")
    model = register_model(home, result.package_dir, name, run_id=result.run_id)
    log(f"$ vivace models register {result.package_dir} --name {name} --run {result.run_id}\n  -> {model.ref}")
    promote(home, name, model.version, alias)
    log(f"$ vivace models promote {name} {model.version} --alias {alias}\n"
        f"  -> {name}@{alias} = version {model.version}")
    return f"{name}@{alias}"


# The demo's pipeline: the churn model, then a Python step that turns its probability into
# what a retention team does about the customer (an ensemble served as one model).
ACTION_STEP = '''
import numpy as np


class Action:
    def predict(self, probability):
        action = np.where(probability >= 0.5, b"call", np.where(probability >= 0.2, b"email", b"none"))
        return {"churn_probability": probability, "action": action.astype(object)}
'''


def write_action_pipeline(churn_package: str | os.PathLike, workdir: str | os.PathLike,
                          log: Callable[[str], None] = print) -> Path:
    """Package `churn_action` (churn model -> Python action step) under `workdir`; returns its directory."""
    from .packaging import package_ensemble, package_python_model

    workdir = Path(workdir)
    source = workdir / "action.py"
    source.write_text(ACTION_STEP)
    action = package_python_model(f"{source}:Action", workdir / "action", name="action",
                                  inputs=["probability:FP32:1"], overwrite=True)
    out = workdir / "churn_action"
    package_ensemble([("churn", churn_package), ("action", action.path)], out, name="churn_action",
                     tensor_map={"churn.output__0": "probability"}, overwrite=True)
    log(f"$ vivace package {source}:Action --out {action.path} --name action --input probability:FP32:1\n"
        f"$ vivace package --out {out} --name churn_action --step churn={churn_package} --step action={action.path} "
        f"--map churn.output__0=probability\n  -> an ensemble: churn (the model) -> action (Python)")
    return out
