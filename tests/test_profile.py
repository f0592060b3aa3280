"""vivace.profile: the one reference-profile writer and validator (issue 20 item 3)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from vivace import profile as profiles
from vivace.monitor.drift import DriftInputError, build_profile, drift_report, validate_profile
from vivace.monitor.sketch import Window, input_sketch
from vivace.registry.profile import build_profile as registry_profile


def _frame(rows: int = 4000) -> pd.DataFrame:
    rng = np.random.default_rng(4)
    inf = rng.lognormal(2, 1, rows)
    inf[::50] = np.inf
    inf[1::50] = -np.inf
    return pd.DataFrame({"amount": rng.lognormal(3, 1.25, rows), "with_inf": inf,
                         "empty": np.full(rows, np.nan), "colour": rng.choice(["red", "blue"], rows)})


def test_train_and_monitor_write_the_same_profile_and_both_validate():
    frame = _frame()
    trained = registry_profile(frame, ["colour"], np.zeros(len(frame)))
    monitored = build_profile({c: frame[c].to_numpy() for c in frame.columns}, categorical=["colour"])
    # Strict JSON round trip (no Infinity/NaN) and the monitor's validator accept both.
    for prof in (trained, monitored):
        assert validate_profile(json.loads(profiles.dumps(prof))) == json.loads(profiles.dumps(prof))
    for name in ("amount", "with_inf", "empty"):
        assert trained["features"][name] == monitored["features"][name], name
    assert trained["features"]["colour"] == monitored["features"]["colour"]
    # +-inf counts as missing, like NaN; an all-missing column has no distribution.
    assert trained["features"]["with_inf"]["null_fraction"] == pytest.approx(160 / 4000)
    assert trained["features"]["with_inf"]["max"] < np.inf
    assert trained["features"]["empty"] == {"kind": "numeric", "count": 4000, "null_fraction": 1.0,
                                            "edges": [], "frequencies": [0.0]}


def test_an_all_missing_reference_column_is_reported_without_statistics():
    frame = _frame()
    prof = registry_profile(frame, ["colour"], np.zeros(len(frame)))
    current = {c: frame[c].to_numpy() for c in frame.columns}
    current["empty"] = np.arange(len(frame), dtype=np.float64)
    report = drift_report(prof, current)
    empty = report.feature("empty")
    assert not empty.drifted and empty.stats["wasserstein"] is None
    assert not report.feature("amount").drifted
    json.loads(report.to_json())
    sketch = input_sketch(prof, ["amount", "with_inf", "empty"], window=Window("rows", 1000, 1))
    sketch.update(np.column_stack([current["amount"], current["with_inf"], current["empty"]]))
    stats = {f.name: f for f in sketch.drift()}
    assert stats["empty"].stats["psi"] is None and not stats["amount"].drifted


def test_profiles_written_before_bin_means_still_load_and_compare():
    rng = np.random.default_rng(6)
    ref = rng.lognormal(3, 1.25, 16_000)
    new = build_profile({"amount": ref})
    old = json.loads(json.dumps(new))
    del old["features"]["amount"]["means"]
    validate_profile(old)
    cur = {"amount": ref[:8000] + ref.std()}
    w_new = drift_report(new, cur).feature("amount").stats["wasserstein"]
    w_old = drift_report(old, cur).feature("amount").stats["wasserstein"]
    assert w_old == pytest.approx(w_new, rel=0.05)


@pytest.mark.parametrize("field,value,message", [
    ("max", float("inf"), "max must be a finite number"),
    ("std", None, "std must be a finite number"),
    ("means", [1.0], "means must be len"),
    ("edges", [9.0 - i for i in range(9)], "edges must be finite and increasing"),
])
def test_the_validator_names_the_problem(field, value, message):
    prof = build_profile({"x": np.random.default_rng(0).normal(size=1000)})
    prof["features"]["x"][field] = value
    with pytest.raises(DriftInputError, match=message):
        validate_profile(prof)
    with pytest.raises(profiles.ProfileError, match=message):
        profiles.validate_profile(prof)


def test_the_profile_floor_imports_no_other_vivace_module():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(profiles))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert {m for m in imported if m and m.startswith("vivace")} == {"vivace"}  # only _core


def test_rows_drawn_from_a_profile_follow_its_marginals_and_encode_categories():
    sample_rows, ProfileError = profiles.sample_rows, profiles.ProfileError
    rng = np.random.default_rng(0)
    data = {"amount": rng.lognormal(3.0, 0.5, 5000), "plan": rng.choice(["basic", "premium", "gold"], 5000,
                                                                         p=[0.6, 0.3, 0.1])}
    profile = build_profile(data, categorical=["plan"])
    rows = sample_rows(profile, [("amount", None), ("plan", ["basic", "premium"])], 20000, seed=1)
    assert rows.dtype == np.float32 and rows.shape == (20000, 2)
    assert data["amount"].min() <= rows[:, 0].min() and rows[:, 0].max() <= data["amount"].max()
    for q in (0.1, 0.5, 0.9):  # decile bins, uniform within: quantiles agree closely
        assert abs(np.quantile(rows[:, 0], q) - np.quantile(data["amount"], q)) < 0.05 * np.quantile(data["amount"], q)
    codes, counts = np.unique(rows[:, 1], return_counts=True)
    assert codes.tolist() == [-1.0, 0.0, 1.0]  # gold is not among the model's categories: -1, as training encodes
    np.testing.assert_allclose(counts / 20000, [0.1, 0.6, 0.3], atol=0.02)
    with pytest.raises(ProfileError, match="no feature 'missing'"):
        sample_rows(profile, [("missing", None)], 10)
    with pytest.raises(ProfileError, match="category frequencies"):
        sample_rows(profile, [("amount", ["a"])], 10)
