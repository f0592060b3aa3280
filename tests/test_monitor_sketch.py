"""Native drift sketches: counts match numpy, sliding windows, categorical codes, threads."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from vivace.monitor.drift import DriftInputError, build_profile
from vivace.monitor.sketch import Window, input_sketch, prediction_sketch

from vivace import _core


@pytest.fixture(scope="module")
def profile():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20000, 8)).astype(np.float32)
    return build_profile(x, predictions=x[:, 0] * 2)


def _numpy_bins(entry, values):
    edges = np.asarray(entry["edges"])
    v = values[~np.isnan(values)].astype(np.float64)
    return np.bincount(np.searchsorted(edges, v, side="left"), minlength=len(edges) + 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_counts_match_numpy(profile, dtype):
    rng = np.random.default_rng(1)
    batch = rng.normal(0.3, 1.5, size=(3000, 8)).astype(dtype)
    batch[::50, 2] = np.nan
    edge = profile["features"]["f1"]["edges"][3]
    batch[:7, 1] = edge  # exactly on an edge: belongs to the lower bin, (e[i-1], e[i]]
    sketch = input_sketch(profile)
    sketch.update(batch[:1000])
    sketch.update(batch[1000:])
    snap = sketch.snapshot()
    assert snap["rows"] == 3000
    for j in range(8):
        name = f"f{j}"
        f, entry = snap["features"][name], profile["features"][name]
        col = batch[:, j]
        assert np.array_equal(f["bins"], _numpy_bins(entry, col)), name
        v = col[~np.isnan(col)].astype(np.float64)
        sums = np.bincount(np.searchsorted(np.asarray(entry["edges"]), v, side="left"), weights=v,
                           minlength=len(entry["edges"]) + 1)
        assert f["sums"] == pytest.approx(sums, rel=1e-12, abs=1e-9), name  # the Wasserstein input
        assert f["nan"] == int(np.isnan(col).sum())
        assert f["below"] == int((col < entry["min"]).sum())
        assert f["above"] == int((col > entry["max"]).sum())


def test_row_window_keeps_the_newest_buckets(profile):
    sketch = input_sketch(profile, window=Window("rows", 100, 3))
    ones = np.ones((250, 8), np.float32)
    sketch.update(ones)  # buckets 0,1 full, bucket 2 holds 50
    assert sketch.snapshot()["rows"] == 250
    sketch.update(np.zeros((100, 8), np.float32))  # fills bucket 2, opens bucket 3: bucket 0 drops
    snap = sketch.snapshot()
    assert snap["rows"] == 250  # buckets 1, 2, 3: 100 + 100 + 50
    assert snap["features"]["f0"]["bins"].sum() == 250
    sketch.native.reset()
    assert sketch.snapshot()["rows"] == 0


def test_time_window_expires_old_buckets(profile):
    sketch = input_sketch(profile, window=Window("time", 1.0, 4))
    rows = np.ones((10, 8), np.float32)
    second = 1_000_000_000
    sketch.native.update(rows, now_ns=100 * second)
    sketch.native.update(rows, now_ns=101 * second + 5)
    sketch.native.update(rows, now_ns=103 * second)
    assert sketch.native.snapshot(now_ns=103 * second)["rows"] == 30
    assert sketch.native.snapshot(now_ns=104 * second)["rows"] == 20  # the t=100 bucket left
    assert sketch.native.snapshot(now_ns=110 * second)["rows"] == 0
    sketch.native.update(rows, now_ns=99 * second)  # older than the window of t=103: dropped
    assert sketch.native.snapshot(now_ns=103 * second)["rows"] == 30


def test_categorical_codes_and_unknown_codes():
    rng = np.random.default_rng(2)
    prof = build_profile({"x": rng.normal(size=1000), "colour": rng.choice(np.array(["red", "blue"]), 1000)})
    sketch = input_sketch(prof, {"x": 0, "colour": 1}, categories={"colour": ["blue", "red"]})
    batch = np.array([[0.0, 0], [0.1, 1], [0.2, 1], [0.3, 7], [0.4, np.nan], [0.5, 1.5]], np.float32)
    sketch.update(batch)
    c = sketch.snapshot()["features"]["colour"]
    assert c["bins"].tolist() == [1, 2] and c["above"] == 2 and c["nan"] == 1
    drift = {f.name: f for f in sketch.drift()}
    assert drift["colour"].detail["new_categories"] == ["<unknown>"]


def test_drift_from_snapshot_flags_shifted_features(profile):
    rng = np.random.default_rng(3)
    sketch = input_sketch(profile, window=Window("rows", 50_000, 2))
    batch = rng.normal(size=(20000, 8)).astype(np.float32)
    batch[:, 5] += 0.5
    sketch.update(batch)
    flagged = [f.name for f in sketch.drift() if f.drifted]
    assert flagged == ["f5"]
    pred = prediction_sketch(profile)
    pred.update((batch[:, :1] * 2).copy())
    assert not pred.drift()[0].drifted


def test_concurrent_updates_lose_nothing(profile):
    sketch = input_sketch(profile, window=Window("rows", 10**9, 1))
    batch = np.random.default_rng(4).normal(size=(512, 8)).astype(np.float32)

    def work():
        for _ in range(50):
            sketch.update(batch)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = sketch.snapshot()
    assert snap["rows"] == 4 * 50 * 512
    assert int(snap["features"]["f0"]["bins"].sum()) == 4 * 50 * 512


def test_bad_batches_and_configs_are_refused(profile):
    sketch = input_sketch(profile)
    with pytest.raises(ValueError, match="batch has 3 columns, the sketch reads 8"):
        sketch.update(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="float32 or float64"):
        sketch.update(np.ones((4, 8), np.int32))
    with pytest.raises(ValueError, match="2-D"):
        sketch.update(np.ones(8, np.float32))
    with pytest.raises(ValueError, match="contiguous"):
        sketch.update(np.ones((8, 4), np.float32).T)
    with pytest.raises(ValueError, match="strictly increasing"):
        _core.DriftSketch([[1.0, 1.0]], [0], [0.0], [1.0], [0])
    with pytest.raises(ValueError, match="window must be"):
        _core.DriftSketch([[1.0]], [0], [0.0], [1.0], [0], "weekly")
    with pytest.raises(DriftInputError, match="not in the profile"):
        input_sketch(profile, {"nope": 0})


def test_sketches_for_a_model_package(tmp_path):
    import json

    from vivace.monitor.sketch import sketches_for_package
    from vivace.registry.package import write_package

    rng = np.random.default_rng(6)
    raw = {"amount": rng.normal(size=5000), "shop": rng.choice(np.array(["a", "b", "c"]), 5000)}
    prof = build_profile(raw, predictions=rng.random(5000))
    specs = [{"name": "shop", "kind": "categorical", "categories": ["a", "b", "c"]},
             {"name": "amount", "kind": "numeric"}]
    manifest = {"name": "m", "version": "1", "platform": "torchscript", "model_file": "model.pt",
                "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, 2]}],
                "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}],
                "metadata": {"features": specs, "profile": "profile.json"}}
    write_package(tmp_path / "pkg", manifest, {"model.pt": b"x", "profile.json": json.dumps(prof).encode()})
    inputs, outputs = sketches_for_package(tmp_path / "pkg")
    rows = np.column_stack([np.full(4000, 2.0), rng.normal(size=4000)]).astype(np.float32)  # all "c"
    inputs.update(rows)
    outputs.update(rng.random((4000, 1)).astype(np.float32))
    flagged = {f.name: f.drifted for f in inputs.drift()}
    assert flagged == {"shop": True, "amount": False}
    assert not outputs.drift()[0].drifted
