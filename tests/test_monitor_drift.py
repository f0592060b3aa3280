"""Drift statistics and reports: scipy agreement, textbook PSI/JS, detection, bad input."""
from __future__ import annotations

import json
import math
import re

import numpy as np
import pyarrow as pa
import pytest
import scipy.stats as st
from scipy.spatial.distance import jensenshannon
from vivace.monitor import drift as d
from vivace.monitor.drift import (
    DriftInputError,
    DriftThresholds,
    build_profile,
    drift_report,
)

from vivace import _core


def _sorted(cols):
    s, n = _core.drift_sort_finite([np.asarray(c, dtype=np.float64) for c in cols])
    return s, n


@pytest.mark.parametrize("make", [
    lambda r: (r.normal(size=3000), r.normal(0.1, 1.2, size=2000)),
    lambda r: (r.integers(0, 5, 1000).astype(float), r.integers(0, 6, 700).astype(float)),  # heavy ties
    lambda r: (r.exponential(size=50), r.exponential(2.0, size=80)),
    lambda r: (np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 2.0, 2.0])),
    lambda r: (r.normal(size=500) * 1e-300, -r.standard_cauchy(size=400)),
])
def test_ks_and_wasserstein_match_scipy(make):
    a, b = make(np.random.default_rng(7))
    sa, na = _sorted([a])
    sb, nb = _sorted([b])
    ks, w = _core.drift_compare_sorted(sa, na, sb, nb)
    ref = st.ks_2samp(a, b, method="asymp")
    assert ks[0] == pytest.approx(ref.statistic, abs=1e-15)
    assert w[0] == pytest.approx(st.wasserstein_distance(a, b), rel=1e-12, abs=1e-300)
    assert d.ks_pvalue(ks[0], len(a), len(b), exact=True) == pytest.approx(ref.pvalue, rel=1e-12, abs=1e-300)


def test_fast_ks_pvalue_close_to_scipy():
    rng = np.random.default_rng(3)
    for shift in (0.0, 0.02, 0.04):
        a, b = rng.normal(size=20000), rng.normal(shift, 1, size=15000)
        ref = st.ks_2samp(a, b, method="asymp")
        fast = float(d.ks_pvalue(ref.statistic, len(a), len(b)))
        assert fast == pytest.approx(ref.pvalue, rel=0.02) or ref.pvalue < 1e-4 and fast < 1e-4


def test_sort_drops_nonfinite_and_orders_signed_zero_and_subnormals():
    x = np.array([3.0, np.nan, -0.0, 0.0, -np.inf, 5e-324, -5e-324, np.inf, -1e300, 1.0 + 1e-15, 1.0])
    s, n = _sorted([x])
    assert n[0] == 8
    finite = x[np.isfinite(x)]
    assert np.array_equal(s[0, :8], np.sort(finite))
    assert np.isnan(s[0, 8:]).all()


def test_sort_matches_numpy_on_strided_columns_and_near_ties():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(5000, 7))
    m[:, 3] = 1.0 + rng.random(5000) * 1e-12  # share the top 44 key bits: exercises the run fix-up
    s, n = _core.drift_sort_finite([m[:, j] for j in range(7)], threads=2)
    for j in range(7):
        assert np.array_equal(s[j, : n[j]], np.sort(m[:, j]))


def test_textbook_psi_and_js():
    r = np.array([0.25, 0.25, 0.5, 0.0])
    c = np.array([0.1, 0.4, 0.3, 0.2])
    rr, cc = np.maximum(r, 1e-4), np.maximum(c, 1e-4)
    textbook = sum((ci - ri) * math.log(ci / ri) for ri, ci in zip(rr, cc))
    assert d.psi(r, c) == pytest.approx(textbook, rel=1e-12)
    assert d.psi(r * 40, c * 10) == pytest.approx(textbook, rel=1e-12)  # counts work too
    m = (r + c) / 2
    kl = lambda p: sum(pi * math.log(pi / mi) for pi, mi in zip(p, m) if pi > 0)
    assert d.js_distance(r, c) == pytest.approx(math.sqrt((kl(r) + kl(c)) / 2), rel=1e-12)
    assert d.js_distance(r, c) == pytest.approx(jensenshannon(r, c), rel=1e-9)
    assert d.js_distance(r, r) == 0.0
    assert d.psi(r, r) == 0.0


def test_report_statistics_match_scipy_per_column():
    rng = np.random.default_rng(11)
    ref = {"a": rng.normal(size=4000), "b": rng.gamma(2.0, size=4000)}
    cur = {"a": rng.normal(0.2, 1, size=3000), "b": rng.gamma(2.2, size=3000)}
    cur["a"][:10] = np.nan
    report = drift_report(ref, cur, exact_pvalues=True)
    for name in ("a", "b"):
        x, y = ref[name], cur[name][np.isfinite(cur[name])]
        f = report.feature(name)
        sp = st.ks_2samp(x, y, method="asymp")
        assert f.stats["ks"] == pytest.approx(sp.statistic, abs=1e-15)
        assert f.stats["ks_pvalue"] == pytest.approx(sp.pvalue, rel=1e-9, abs=1e-300)
        assert f.stats["wasserstein"] == pytest.approx(st.wasserstein_distance(x, y) / x.std(), rel=1e-10)
        edges = np.quantile(x, np.linspace(0, 1, 11)[1:-1])
        rc = np.bincount(np.searchsorted(edges, x, side="left"), minlength=10)
        cc = np.bincount(np.searchsorted(edges, y, side="left"), minlength=10)
        assert f.stats["psi"] == pytest.approx(d.psi(rc, cc), rel=1e-9)
        assert f.stats["js"] == pytest.approx(jensenshannon(rc / rc.sum(), cc / cc.sum()), rel=1e-9)
    assert report.feature("a").current_missing == pytest.approx(10 / 3000)


def test_detection_five_shifted_of_twenty():
    """n = 100,000 rows each side, seed 2026: shifts of +0.05, +0.1, +0.25 std, x1.3 scale,
    and a mixture; the 15 unshifted columns stay quiet at the default thresholds."""
    rng = np.random.default_rng(2026)
    n = 100_000
    ref = {f"x{j:02d}": rng.normal(size=n) for j in range(20)}
    cur = {f"x{j:02d}": rng.normal(size=n) for j in range(20)}
    cur["x03"] += 0.05
    cur["x07"] += 0.1
    cur["x11"] += 0.25
    cur["x15"] *= 1.3
    cur["x19"] = np.where(rng.random(n) < 0.1, rng.normal(3, 1, n), cur["x19"])
    report = drift_report(ref, cur)
    assert report.drifted_features == ["x03", "x07", "x11", "x15", "x19"]
    small = report.feature("x03")
    assert small.crossed == ["ks"]  # only the KS rule sees +0.05 std
    assert small.stats["wasserstein"] < 0.1 and small.stats["js"] < 0.1  # Evidently's rules miss it
    assert not report.dataset_drift


def test_categorical_drift_and_new_categories():
    rng = np.random.default_rng(5)
    cats = np.array(["red", "green", "blue"])
    ref = {"c": rng.choice(cats, 5000, p=[0.6, 0.3, 0.1]), "same": rng.choice(cats, 5000)}
    cur = {"c": np.concatenate([rng.choice(cats, 4000, p=[0.2, 0.3, 0.5]), np.full(1000, "violet")]),
           "same": rng.choice(cats, 5000)}
    report = drift_report(ref, cur)
    c = report.feature("c")
    assert c.kind == "categorical" and c.drifted
    assert c.detail["new_categories"] == ["violet"]
    assert not report.feature("same").drifted
    # arrow input (dictionary and plain strings) gives the same numbers
    arrow = drift_report(pa.table({"c": pa.array(ref["c"]).dictionary_encode(), "same": ref["same"]}),
                         pa.table({"c": cur["c"], "same": cur["same"]}))
    assert arrow.feature("c").stats == pytest.approx(c.stats)


def test_profile_format_matches_registry_profile():
    from vivace.registry.profile import FORMAT, numeric_profile

    rng = np.random.default_rng(1)
    x = rng.normal(size=5001)
    x[::97] = np.nan
    prof = build_profile({"x": x, "k": rng.choice(np.array(["a", "b"]), 5001)}, predictions=x[:100])
    assert prof["format"] == FORMAT
    mine, theirs = prof["features"]["x"], numeric_profile(x)
    assert mine.keys() == theirs.keys()
    for key in theirs:
        if isinstance(theirs[key], str):
            assert mine[key] == theirs[key], key
        else:
            assert mine[key] == pytest.approx(theirs[key], rel=1e-12), key
    assert prof["features"]["k"]["frequencies"].keys() == {"a", "b"}
    assert prof["prediction"]["kind"] == "numeric"
    assert d.validate_profile(json.loads(json.dumps(prof))) == prof


def test_report_against_profile_flags_the_same_columns():
    rng = np.random.default_rng(9)
    ref = {"a": rng.normal(size=50_000), "b": rng.normal(size=50_000),
           "k": rng.choice(np.array(["x", "y"]), 50_000)}
    cur = {"a": rng.normal(0.3, 1, size=50_000), "b": rng.normal(size=50_000),
           "k": rng.choice(np.array(["x", "y"]), 50_000, p=[0.8, 0.2])}
    report = drift_report(build_profile(ref), cur)
    assert not report.exact_reference
    assert report.drifted_features == ["a", "k"]
    exact = drift_report(ref, cur)
    # binned KS is a lower bound of the exact one, close with deciles
    assert report.feature("a").stats["ks"] <= exact.feature("a").stats["ks"] + 1e-12
    assert report.feature("a").stats["ks"] == pytest.approx(exact.feature("a").stats["ks"], rel=0.15)


def test_thresholds_global_and_per_feature():
    rng = np.random.default_rng(4)
    ref = {"a": rng.normal(size=20000), "b": rng.normal(size=20000)}
    cur = {"a": rng.normal(0.3, 1, size=20000), "b": rng.normal(0.3, 1, size=20000)}
    report = drift_report(ref, cur, thresholds=DriftThresholds(ks=None, psi=None, js=None, wasserstein=0.5),
                          feature_thresholds={"b": {"wasserstein": 0.2}})
    assert report.drifted_features == ["b"]
    with pytest.raises(DriftInputError, match="unknown drift threshold"):
        DriftThresholds.from_dict({"psy": 0.1})


def test_html_is_self_contained_and_json_is_strict():
    rng = np.random.default_rng(2)
    ref = {"x<script>": rng.normal(size=2000), "const": np.zeros(2000),
           "k": rng.choice(np.array(["a", "b", "c"]), 2000)}
    cur = {"x<script>": rng.normal(1, 1, size=2000), "const": np.ones(2000),
           "k": rng.choice(np.array(["a", "b", "d"]), 2000)}
    report = drift_report(ref, cur)
    page = report.to_html()
    assert page.startswith("<!DOCTYPE html>")
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "http://" not in page and "https://" not in page
    assert "<script" not in page  # the hostile column name is escaped
    assert page.count("<svg") == 3
    data = json.loads(report.to_json())
    assert data["features"][1]["stats"]["wasserstein"] is None  # std 0: infinite, not NaN in JSON
    assert report.feature("const").drifted


@pytest.mark.parametrize("ref, cur, message", [
    ({"a": np.array([])}, {"a": np.array([1.0])}, "reference data has no rows"),
    ({}, {"a": np.array([1.0])}, "reference data has no columns"),
    ({"a": np.ones(5), "b": np.ones(5)}, {"a": np.ones(5)}, "current data lacks reference column.*b"),
    ({"a": np.full(5, np.nan)}, {"a": np.ones(5)}, "'a' of the reference has no finite values"),
    ({"a": np.ones(5)}, {"a": np.full(5, np.nan)}, "'a' of the current data has no finite values"),
    ({"a": np.ones(3)}, {"a": np.array([1.0, "junk", 2.0], dtype=object)}, "non-numeric value 'junk'"),
    ({"k": np.array(["a", "b"])}, {"k": np.array([1.0, 2.0])}, "categorical .* but numeric"),
    ({"a": np.ones(3), "b": np.ones(4)}, {"a": np.ones(3)}, "different lengths"),
])
def test_bad_input_is_named(ref, cur, message):
    with pytest.raises(DriftInputError, match=message):
        drift_report(ref, cur)


def test_bad_profiles_are_refused():
    with pytest.raises(DriftInputError, match="not a drift profile"):
        d.validate_profile({"format": "something-else"})
    prof = build_profile({"a": np.arange(100.0)})
    prof["features"]["a"]["frequencies"] = [1.0]
    with pytest.raises(DriftInputError, match="len\\(edges\\)\\+1 frequencies"):
        d.validate_profile(prof)


def test_profile_comparison_sees_values_beyond_the_reference_range():
    prof = build_profile({"const": np.zeros(20000), "x": np.random.default_rng(0).normal(size=20000)})
    prof["features"]["const"].update(edges=[], frequencies=[1.0], means=[0.0])  # a single open bin
    report = drift_report(prof, {"const": np.full(10000, 3.0), "x": np.random.default_rng(1).normal(size=10000)})
    const = report.feature("const")
    assert const.drifted and const.stats["ks"] == 1.0 and const.detail["out_of_range"] == 1.0
    assert not report.feature("x").drifted
