"""Training: reproducibility, run records, behavioural tests, package + profile, runs CLI."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from vivace.registry import Home, NotFoundError, RegistryError
from vivace.registry.cli import register as register_cli
from vivace.registry.data import add_dataset
from vivace.registry.demo_data import TRAIN_CONFIG, churn_frame, run_lifecycle
from vivace.registry.models import get_version, model_card, promote, register_model
from vivace.registry.package import load_package
from vivace.registry.runs import compare_runs, get_run, list_runs
from vivace.monitor.quality import auc as auc_score
from vivace.registry.train import encode, normalize_config, train


def run_cli(home, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="vivace")
    parser.add_argument("--home")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["--home", str(home), *argv])
    return args.func(args)


def small_config(**overrides) -> dict:
    config = yaml.safe_load(TRAIN_CONFIG.read_text())
    config["train"]["epochs"] = 3
    config.update(overrides)
    return config


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    churn_frame(rows=1500).to_parquet(root / "churn.parquet")
    with Home(root / "home") as h:
        add_dataset(h, "churn", root / "churn.parquet")
        yield h


@pytest.fixture(scope="module")
def first(home):
    return train(home, small_config())


def test_same_config_same_data_same_weights_and_metrics(home, first):
    second = train(home, small_config())
    assert second.run_id != first.run_id
    assert second.weights_hash == first.weights_hash
    assert second.metrics == first.metrics
    other_seed = train(home, small_config(seed=1))
    assert other_seed.weights_hash != first.weights_hash


def test_run_record(home, first):
    run = get_run(home, first.run_id)
    assert run.status == "finished" and run.error is None and run.duration_s > 0
    assert run.datasets == ["churn@v1"] and run.params["seed"] == 42 and run.params["train"]["epochs"] == 3
    assert [e["epoch"] for e in run.epochs] == [1, 2, 3] and {"train_loss", "auc", "logloss"} <= set(run.epochs[0])
    assert set(run.metrics) == {"accuracy", "auc", "logloss"} and 0.6 < run.metrics["auc"] <= 1
    assert run.environment["python"] and run.environment["packages"]["torch"] == torch.__version__.split("+")[0] \
        or run.environment["packages"]["torch"].startswith(torch.__version__.split("+")[0])
    assert [t["name"] for t in run.behavioural] == [t["name"] for t in small_config()["behavioural_tests"]]
    assert all({"passed", "detail", "type"} <= set(t) for t in run.behavioural)
    assert get_run(home, first.run_id[:6]).id == first.run_id


def test_package_signature_model_and_profile(home, first):
    package = load_package(first.package_dir)
    assert package.platform == "torchscript" and package.max_batch_size == 128
    assert [t.to_json() for t in package.inputs] == [{"name": "input__0", "datatype": "FP32", "shape": [-1, 6]}]
    assert [t.to_json() for t in package.outputs] == [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}]
    features = package.metadata["features"]
    assert [f["name"] for f in features] == ["tenure_months", "monthly_charges", "support_calls",
                                             "contract", "plan", "region"]
    assert features[3]["categories"] == ["month-to-month", "one-year", "two-year"]
    assert package.metadata["profile"] == "profile.json" and "profile.json" in package.files
    model = torch.jit.load(str(package.model_path))
    rows = churn_frame(rows=20, seed=99)
    x = encode(rows, features)
    x[0, 0] = np.nan          # a missing numeric value is filled inside the model
    x[1, 3] = -1              # an unseen category is all-zero one-hot
    out = model(torch.from_numpy(x)).numpy()
    assert out.shape == (20, 1) and np.all((out > 0) & (out < 1))
    profile = json.loads((first.package_dir / "profile.json").read_text())
    tenure = profile["features"]["tenure_months"]
    assert tenure["kind"] == "numeric" and len(tenure["frequencies"]) == len(tenure["edges"]) + 1
    assert abs(sum(tenure["frequencies"]) - 1) < 1e-9
    assert set(profile["features"]["plan"]["frequencies"]) == {"basic", "standard", "premium"}
    assert profile["rows"] == 1200 and profile["prediction"]["kind"] == "numeric"


def test_failed_runs_are_recorded(home):
    with pytest.raises(RegistryError, match="columns \\['nope'\\] are not in dataset"):
        train(home, small_config(target="nope"))
    with pytest.raises(NotFoundError, match="unknown dataset 'ghost'"):
        train(home, small_config(dataset="ghost@v1"))
    failed = [r for r in list_runs(home) if r.status == "failed" and ("nope" in r.error or "ghost" in r.error)]
    assert len(failed) == 2 and "nope" in failed[0].error and "ghost" in failed[1].error
    assert all(r.ended_at and r.package_sha is None for r in failed)
    with pytest.raises(RegistryError, match="only a finished run"):
        register_model(home, "unused", "m", run_id=failed[0].id)


@pytest.mark.parametrize("change, message", [
    ({"target": None}, "'target' is required"),
    ({"dataset": None}, "'dataset' \\(name@version\\) or 'training_set' is required"),
    ({"training_set": {"entities": "l@v1"}}, "training_set needs"),
    ({"task": "ranking"}, "task must be one of"),
    ({"model": {"hidden": [0]}}, "model.hidden"),
    ({"model": {"activation": "swish!"}}, "model.activation"),
    ({"metrics": ["rmse"]}, "not available for binary"),
    ({"split": {"validation": 1.5}}, "split.validation"),
    ({"behavioural_tests": [{"type": "directional", "feature": "x"}]}, "expect: increase|decrease"),
    ({"learning_rate": 0.1}, "unknown keys"),
])
def test_config_errors(change, message):
    with pytest.raises(RegistryError, match=message):
        normalize_config(small_config(**change))


def test_register_from_run_then_gate_on_behavioural_and_metric(home, first, tmp_path):
    mv = register_model(home, first.package_dir, "churn", run_id=first.run_id)
    assert mv.metrics == first.metrics and mv.lineage["datasets"] == ["churn@v1"]
    assert mv.lineage["weights_sha256"] == first.weights_hash and mv.behavioural == first.behavioural
    # A config whose invariance tolerance cannot be met fails the gate on behavioural tests.
    strict = small_config(seed=3)
    strict["behavioural_tests"][0]["tolerance"] = 0.0
    strict["behavioural_tests"][0]["set"] = "south"
    bad = train(home, strict)
    assert not bad.behavioural[0]["passed"]
    register_model(home, bad.package_dir, "churn", run_id=bad.run_id)
    promote(home, "churn", 1)
    with pytest.raises(RegistryError, match="behavioural tests: failed: region-does-not-matter"):
        promote(home, "churn", 2, margin=-1)
    card = model_card(home, "churn@production")
    assert "trained on `churn@v1`" in card and "Rank subscription customers" in card
    assert "| region-does-not-matter | invariance |" in card


def test_regression_task(home):
    config = small_config(target="monthly_charges", task="regression", metrics=["rmse", "mae"],
                          behavioural_tests=[{"type": "directional", "feature": "tenure_months", "delta": 5,
                                              "expect": "increase", "min_fraction": 0.0}])
    result = train(home, config)
    assert set(result.metrics) == {"rmse", "mae"} and result.metrics["rmse"] < 15  # plan explains most of it
    package = load_package(result.package_dir)
    model = torch.jit.load(str(package.model_path))
    x = encode(churn_frame(rows=200, seed=5), package.metadata["features"])
    predictions = model(torch.from_numpy(x)).numpy()
    assert 30 < predictions.mean() < 80  # de-standardized inside the model, in the target's units


def test_too_few_rows_is_a_clear_failure(home, tmp_path):
    churn_frame(rows=2).to_csv(tmp_path / "tiny.csv", index=False)
    add_dataset(home, "tiny", tmp_path / "tiny.csv")
    with pytest.raises(RegistryError, match="2 rows leave 1 for training"):
        train(home, small_config(dataset="tiny@v1"))


def test_auc_matches_definition():
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.1, 0.4, 0.35, 0.8, 0.4])
    pairs = [(i, j) for i in range(5) for j in range(5) if y[i] == 1 and y[j] == 0]
    expected = sum(1.0 if p[i] > p[j] else 0.5 if p[i] == p[j] else 0.0 for i, j in pairs) / len(pairs)
    assert auc_score(y, p) == pytest.approx(expected)


def test_cli_train_and_runs(home, first, tmp_path, capsys):
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(small_config(seed=5)))
    assert run_cli(home.path, "train", str(config), "--output", str(tmp_path / "pkg"), "--register", "cli-model") == 0
    out = capsys.readouterr().out
    assert "finished: accuracy=" in out and "registered cli-model/1" in out and (tmp_path / "pkg" / "model.pt").exists()
    run_id = get_version(home, "cli-model/1").run_id
    assert run_cli(home.path, "runs", "list") == 0
    assert run_id in capsys.readouterr().out
    assert run_cli(home.path, "runs", "show", run_id) == 0
    out = capsys.readouterr().out
    assert "epoch" in out and "weights sha256" in out and "behavioural [pass]" in out
    assert run_cli(home.path, "runs", "compare", first.run_id, run_id) == 0
    out = capsys.readouterr().out
    assert "*param.seed" in out and "metric.auc" in out
    assert "*param.seed" in compare_runs(home, [first.run_id, run_id])
    assert run_cli(home.path, "models", "register", "--name", "from-run", "--run", run_id) == 0
    assert run_cli(home.path, "runs", "show", "zzzz") == 1
    config.write_text(yaml.safe_dump(small_config(target="missing")))
    assert run_cli(home.path, "train", str(config)) == 1
    assert "not in dataset" in capsys.readouterr().err


def test_demo_lifecycle(tmp_path):
    lines = []
    ref = run_lifecycle(tmp_path / "home", tmp_path, log=lines.append)
    assert ref == "churn@production" and len(lines) == 4 and "vivace models promote churn 1" in lines[-1]
    with Home(tmp_path / "home") as home:
        mv = get_version(home, ref)
        assert mv.lineage["datasets"] == ["churn@v1"] and all(t["passed"] for t in mv.behavioural)
        assert mv.metrics["auc"] > 0.75


def test_train_from_feature_store_training_set(tmp_path):
    from vivace.features import Entity, FeatureStore, FeatureView, Field

    churn = churn_frame(rows=800)
    when = pd.Timestamp("2025-03-01", tz="UTC")
    stats = churn[["customer_id", "tenure_months", "support_calls", "contract"]].assign(
        event_timestamp=when - pd.Timedelta(days=1), tenure_months=lambda d: d.tenure_months.astype("float64"))
    stats.to_parquet(tmp_path / "stats.parquet")
    labels = churn[["customer_id", "churned"]].assign(event_timestamp=when)
    labels.to_parquet(tmp_path / "labels.parquet")
    with Home(tmp_path / "home") as home:
        FeatureStore(home.path).apply([
            Entity("customer", "customer_id"),
            FeatureView("customer_stats", "customer", str(tmp_path / "stats.parquet"),
                        [Field("tenure_months", "float64"), Field("support_calls", "int64"),
                         Field("contract", "string")], ttl="7d"),
        ])
        add_dataset(home, "labels", tmp_path / "labels.parquet")
        config = small_config(training_set={"entities": "labels@v1", "features": ["customer_stats:*"]},
                              behavioural_tests=[])
        del config["dataset"]
        result = train(home, config)
        run = get_run(home, result.run_id)
        assert run.datasets == ["labels@v1"] and run.feature_views == ["customer_stats"]
        package = load_package(result.package_dir)
        assert [f["name"] for f in package.metadata["features"]] == ["tenure_months", "support_calls", "contract"]
        assert package.metadata["feature_views"] == ["customer_stats"]
        assert register_model(home, result.package_dir, "fs", run_id=run.id).lineage["feature_views"] == [
            "customer_stats"]
        config["training_set"]["features"] = ["customer_stats:nope"]
        with pytest.raises(RegistryError, match="training set: unknown feature 'nope'"):
            train(home, config)


def test_fresh_process_reproduces_the_weights(home, first, tmp_path):
    """A new interpreter (fresh torch state) trains exactly the weights trained in-process."""
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(small_config()))
    code = "import sys; from vivace.registry.train import train; print(train(sys.argv[1], sys.argv[2]).weights_hash)"
    done = subprocess.run([sys.executable, "-c", code, str(home.path), str(config)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == first.weights_hash


def test_a_numeric_column_spoiled_by_a_few_bad_values_is_flagged_then_refused(tmp_path):
    frame = churn_frame(rows=600)
    spoiled = frame["monthly_charges"].round(2).astype(str)
    spoiled.iloc[[3, 70]] = ["n/a", "12,5"]
    frame["monthly_charges"] = spoiled
    frame.to_parquet(tmp_path / "churn.parquet")
    home = tmp_path / "home"
    added = subprocess.run([sys.executable, "-m", "vivace", "--home", str(home), "data", "add", "churn",
                            str(tmp_path / "churn.parquet")], capture_output=True, text=True, timeout=120)
    assert added.returncode == 0, added.stderr
    assert "'monthly_charges' is numeric but for 2 value(s)" in added.stderr and "'n/a'" in added.stderr
    with pytest.raises(RegistryError, match=r"column 'monthly_charges' .* numeric but for 2 value\(s\)"):
        train(home, small_config())
    # Declared categorical, the user gets what they asked for.
    from vivace.registry.train import feature_specs

    config = normalize_config(small_config(categorical=["monthly_charges"]))
    specs = {s["name"]: s for s in feature_specs(frame, config)}
    assert specs["monthly_charges"]["kind"] == "categorical" and "n/a" in specs["monthly_charges"]["categories"]


def test_an_undeclared_text_column_with_too_many_levels_is_refused(tmp_path):
    frame = churn_frame(rows=600)
    frame["customer_note"] = [f"note {i}" for i in range(len(frame))]
    frame.to_parquet(tmp_path / "churn.parquet")
    with Home(tmp_path / "home") as h:
        add_dataset(h, "churn", tmp_path / "churn.parquet")
        with pytest.raises(RegistryError, match=r"'customer_note' .* 600 distinct values \(more than 100\)"):
            train(h, small_config())
        assert train(h, small_config(drop=["customer_id", "customer_note"])).run_id
