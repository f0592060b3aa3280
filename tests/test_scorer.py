"""Offline scoring: the Scorer API and `vivace score`, against the torch module itself."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from vivace.registry.reference_model import reference_module, write_reference_model
from vivace.engine import Scorer
from vivace.registry.package import PackageError, load_package


def torch_scores(x: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return reference_module()(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def scorer(mlp_package):
    return Scorer(mlp_package)


def test_numpy_in_numpy_out_matches_torch(scorer):
    x = np.random.default_rng(0).standard_normal((257, 32)).astype(np.float32)
    out = scorer.predict(x)
    assert isinstance(out, np.ndarray) and out.shape == (257, 1)
    np.testing.assert_allclose(out, torch_scores(x), atol=1e-5)


def test_torch_in_torch_out_and_single_rows(scorer):
    import torch

    x = torch.randn(4, 32)
    out = scorer.predict(x)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), torch_scores(x.numpy()), atol=1e-5)
    row = np.ones(32, np.float32)
    assert scorer.predict(row).shape == (1, 1)
    assert scorer.predict({"input__0": row[None]}).shape == (1, 1)


def test_large_inputs_are_chunked(mlp_package):
    small = Scorer(mlp_package, batch_size=100)
    x = np.random.default_rng(1).standard_normal((1050, 32)).astype(np.float32)
    np.testing.assert_allclose(small.predict(x), torch_scores(x), atol=1e-5)


def test_float64_input_is_cast_but_wrong_shapes_and_types_are_refused(scorer):
    x = np.random.default_rng(2).standard_normal((3, 32))
    np.testing.assert_allclose(scorer.predict(x), torch_scores(x.astype(np.float32)), atol=1e-5)
    with pytest.raises(ValueError, match="shape"):
        scorer.predict(np.ones((3, 31), np.float32))
    with pytest.raises(ValueError, match="dtype"):
        scorer.predict(np.array([["a"] * 32]))
    with pytest.raises(ValueError, match="unknown inputs"):
        scorer.predict({"nope": np.ones((1, 32), np.float32)})
    with pytest.raises(TypeError):
        scorer.predict([[0.0] * 32])


def test_torch_export_package(tmp_path):
    package = write_reference_model(tmp_path / "exported", platform="torch_export")
    x = np.random.default_rng(3).standard_normal((5, 32)).astype(np.float32)
    np.testing.assert_allclose(Scorer(package).predict(x), torch_scores(x), atol=1e-5)


def test_corrupted_model_file_is_refused(mlp_package, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(mlp_package, copy)
    data = bytearray((copy / "model.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "model.pt").write_bytes(bytes(data))
    with pytest.raises(PackageError, match="corrupted"):
        Scorer(copy)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda m: m.pop("inputs"), "inputs"),
        (lambda m: m.update(format="other"), "format"),
        (lambda m: m["inputs"][0].update(shape=[32]), "batch dimension"),
        (lambda m: m["inputs"][0].update(datatype="FP99"), "datatype"),
        (lambda m: m.update(max_batch_size=0), "max_batch_size"),
        (lambda m: m.update(model_file="../etc/passwd"), "model_file"),
        (lambda m: m["dynamic_batching"].update(preferred_batch_size=[1000]), "preferred_batch_size"),
    ],
)
def test_invalid_manifests_are_refused(mlp_package, tmp_path, mutate, message):
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(mlp_package, copy)
    manifest = json.loads((copy / "package.json").read_text())
    mutate(manifest)
    (copy / "package.json").write_text(json.dumps(manifest))
    with pytest.raises(PackageError, match=message):
        load_package(copy)


def test_truncated_manifest_is_refused(mlp_package, tmp_path):
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(mlp_package, copy)
    (copy / "package.json").write_text((mlp_package / "package.json").read_text()[:40])
    with pytest.raises(PackageError, match="invalid JSON"):
        load_package(copy)


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "vivace.cli", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_score_cli_npy_and_parquet(mlp_package, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = np.random.default_rng(4).standard_normal((50, 32)).astype(np.float32)
    np.save(tmp_path / "in.npy", x)
    result = run_cli("score", mlp_package, "--input", tmp_path / "in.npy", "--output", tmp_path / "out.npy")
    assert result.returncode == 0, result.stderr
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), torch_scores(x), atol=1e-5)

    pq.write_table(pa.table({f"f{i}": x[:, i] for i in range(32)}), tmp_path / "in.parquet")
    result = run_cli("score", mlp_package, "--input", tmp_path / "in.parquet", "--output", tmp_path / "out.parquet")
    assert result.returncode == 0, result.stderr
    scored = pq.read_table(tmp_path / "out.parquet").column("output__0").to_numpy()
    np.testing.assert_allclose(scored, torch_scores(x)[:, 0], atol=1e-5)


def test_score_cli_errors_are_one_line_and_write_nothing(mlp_package, tmp_path):
    np.save(tmp_path / "bad.npy", np.ones((3, 7), np.float32))
    result = run_cli("score", mlp_package, "--input", tmp_path / "bad.npy", "--output", tmp_path / "out.npy")
    assert result.returncode == 1
    assert "shape" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.npy").exists()
    result = run_cli("score", tmp_path / "missing", "--input", tmp_path / "bad.npy", "--output", tmp_path / "o.npy")
    assert result.returncode == 1 and "not a package directory" in result.stderr
    result = run_cli("bench", "model", "--out", mlp_package)
    assert result.returncode == 1 and "already exists" in result.stderr


@pytest.fixture(scope="module")
def native_package(mlp_package, tmp_path_factory):
    from vivace.engine.native.convert import quantize_package

    out = tmp_path_factory.mktemp("native") / "mlp-int8"
    calibration = np.random.default_rng(3).standard_normal((256, 32)).astype(np.float32)
    quantize_package(mlp_package, out, calibration, precision="int8")
    return out


def test_native_scorer_honours_num_threads(native_package):
    assert Scorer(native_package, num_threads=2).backend.model.num_threads == 2
    assert Scorer(native_package).backend.model.num_threads == 1


def test_native_scorer_fast_path_matches_general_path(native_package):
    scorer = Scorer(native_package)
    x = np.random.default_rng(5).standard_normal((33, 32)).astype(np.float32)
    want = scorer.backend.model.forward(x)
    np.testing.assert_array_equal(scorer.predict(x), want)  # the direct path
    np.testing.assert_array_equal(scorer.predict([x]), want)  # the general path
    np.testing.assert_array_equal(scorer.predict({scorer.package.inputs[0].name: x}), want)
    np.testing.assert_array_equal(scorer.predict(np.asfortranarray(x)), want)
    np.testing.assert_array_equal(scorer.predict(x.astype(np.float64)), want)
    np.testing.assert_array_equal(scorer.predict(x[0]), want[:1])
    with pytest.raises(ValueError, match="shape"):
        scorer.predict(x[:, :31])
    small = Scorer(native_package, batch_size=8)
    np.testing.assert_array_equal(small.predict(x), want)  # chunked, not the direct path
    got = scorer(x)  # __call__ takes the direct path too; its array is the caller's own
    np.testing.assert_array_equal(got, want)
    assert got.dtype == np.float32 and got.shape == (33, 1)
    assert got.flags.c_contiguous and got.flags.writeable and got.flags.owndata
    assert scorer.predict(x[:0]).shape == (0, 1)


def test_a_dropped_native_scorer_is_freed_at_once(native_package):
    import gc
    import weakref

    scorer = Scorer(native_package)
    scorer.predict(np.zeros((2, 32), np.float32))
    model = weakref.ref(scorer.backend.model)
    gc.disable()
    try:
        del scorer  # no reference cycle through its fast path: freed without a collection
        assert model() is None
    finally:
        gc.enable()
