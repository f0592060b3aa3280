"""Bias at training time: `sensitive:` in the train config gives group metrics on the
validation split (checked by hand against the packaged model), training-time permutation
importance (checked against a direct permutation), a promotion-gate check
(--max-group-difference) and the model card's group metrics and risk assessment."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from vivace.registry.demo_data import run_lifecycle

    home = tmp_path_factory.mktemp("home")
    run_lifecycle(home, home / "work", log=lambda line: None)
    return home


def _validation(home):
    """The validation rows and the packaged model's predictions on them, as train.py splits."""
    from vivace.engine import Scorer
    from vivace.registry.data import open_dataset
    from vivace.registry.models import resolve
    from vivace.registry.train import encode
    from vivace.registry.package import load_package

    path = resolve(home, "churn@production")
    package = load_package(path)
    frame = open_dataset("churn@v1", home)
    order = np.random.default_rng(42).permutation(len(frame))  # the config's seed
    val = np.sort(order[:int(round(len(frame) * 0.2))])
    rows = frame.iloc[val].reset_index(drop=True)
    x = encode(rows, package.metadata["features"])
    scorer = Scorer(path, num_threads=1)
    return package, rows, x, lambda a: np.asarray(scorer.predict(a.astype(np.float32))).reshape(-1)


def test_training_records_group_metrics_and_importance(trained):
    package, rows, x, predict = _validation(trained)
    y, p = rows["churned"].to_numpy(float), predict(x)
    fairness = package.metadata["fairness"]["region"]
    assert package.metadata["sensitive"] == ["region"]
    chosen = p >= 0.5
    rates, tprs, errors = {}, {}, {}
    for g in sorted(set(rows["region"])):
        sel = rows["region"].to_numpy() == g
        rates[g] = chosen[sel].mean()
        tprs[g] = chosen[sel & (y == 1)].mean()
        errors[g] = (chosen[sel] != (y[sel] == 1)).mean()
        assert fairness["groups"][g]["rows"] == int(sel.sum())
    assert {g: v["selection_rate"] for g, v in fairness["groups"].items()} == pytest.approx(rates, abs=1e-6)
    assert {g: v["error_rate"] for g, v in fairness["groups"].items()} == pytest.approx(errors, abs=1e-6)
    assert fairness["demographic_parity_difference"] == pytest.approx(max(rates.values()) - min(rates.values()),
                                                                      abs=1e-6)
    assert fairness["equal_opportunity_difference"] == pytest.approx(max(tprs.values()) - min(tprs.values()),
                                                                     abs=1e-6)

    # training importance: the documented permutation, redone here on the packaged model
    importance = package.metadata["importance"]
    assert importance["method"] == "permutation" and importance["metric"] == "auc" and importance["rows"] == len(x)
    rng = np.random.default_rng(42)
    base = roc_auc_score(y, p)
    names = [f["name"] for f in package.metadata["features"]]
    drops = np.zeros((3, len(names)))
    for r in range(3):
        for j in range(len(names)):
            xp = x.copy()
            xp[:, j] = x[rng.permutation(len(x)), j]
            drops[r, j] = base - roc_auc_score(y, predict(xp))
    assert [importance["features"][n] for n in names] == pytest.approx(drops.mean(axis=0).tolist(), abs=1e-4)
    assert importance["features"]["tenure_months"] > 10 * abs(importance["features"]["region"])


def vivace(home, *args):
    return subprocess.run([sys.executable, "-m", "vivace.cli", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=120, env=dict(os.environ))


def test_promotion_gate_checks_group_differences_and_the_card_reports_them(trained):
    from vivace.registry.models import get_version

    refused = vivace(trained, "models", "promote", "churn", "1", "--alias", "fair", "--max-group-difference", "0.01")
    assert refused.returncode != 0
    assert "[FAIL] group metrics: region: equal_opportunity_difference" in refused.stdout + refused.stderr
    from vivace.registry.store import NotFoundError

    with pytest.raises(NotFoundError):
        get_version(trained, "churn@fair")
    passed = vivace(trained, "models", "promote", "churn", "1", "--alias", "fair", "--max-group-difference", "0.9")
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert get_version(trained, "churn@fair").version == 1

    card = vivace(trained, "models", "card", "churn@fair")
    assert card.returncode == 0, card.stderr
    text = card.stdout
    for section in ("## Feature importance (training)", "## Group metrics", "### region",
                    "demographic parity difference", "| east |", "## Risk assessment"):
        assert section in text, section


def test_train_config_refuses_bad_sensitive_fields(trained):
    from vivace.registry.store import RegistryError
    from vivace.registry.train import load_config, normalize_config, train
    from vivace.registry.demo_data import TRAIN_CONFIG

    config = load_config(TRAIN_CONFIG)
    with pytest.raises(RegistryError, match="sensitive must be a list"):
        normalize_config({**config, "sensitive": "region"})
    with pytest.raises(RegistryError, match="sensitive column 'gender'"):
        train(trained, {**config, "dataset": "churn@v1", "sensitive": ["gender"], "train": {"epochs": 1}})
