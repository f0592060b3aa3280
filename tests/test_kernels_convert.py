"""Torch MLP -> native package conversion, the accuracy gate, NativeMLPBackend and `vivace quantize`."""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from vivace.engine.native import NativeMLPBackend  # noqa: E402
from vivace.engine.native import cli as quantize_cli  # noqa: E402
from vivace.engine.native.convert import (  # noqa: E402
    ConversionError,
    convert,
    quantize_package,
    save_torch_package,
    spec_from_torch,
)
from vivace.registry.package import PackageError, load_package, write_package  # noqa: E402


def reference_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1), nn.Sigmoid()).eval()


def normalised_model() -> nn.Module:
    torch.manual_seed(1)
    bn = nn.BatchNorm1d(7)
    bn.running_mean.uniform_(-3, 3)
    bn.running_var.uniform_(0.5, 4)
    mid = nn.BatchNorm1d(33)
    mid.running_mean.uniform_(-1, 1)
    mid.running_var.uniform_(0.5, 2)
    return nn.Sequential(bn, nn.Linear(7, 33), mid, nn.GELU(), nn.Dropout(0.1),
                         nn.Sequential(nn.Linear(33, 17), nn.Tanh()), nn.Linear(17, 3), nn.Identity()).eval()


def rows(n: int, features: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, features)).astype(np.float32)


def torch_out(model, x):
    with torch.no_grad():
        return model(torch.from_numpy(x)).numpy()


@pytest.fixture(scope="module")
def torch_package(tmp_path_factory):
    return save_torch_package(reference_model(), tmp_path_factory.mktemp("src") / "mlp", "mlp", 32)


def test_sequential_with_normalisation_folds_and_matches_torch():
    model = normalised_model()
    spec = spec_from_torch(model)
    assert spec.activations == ["gelu", "tanh", "identity"] and spec.in_features == 7
    x = rows(300, 7) * 3
    native, accuracy = convert(model, x, precision="fp32", tolerance=1e-4)
    assert accuracy.max_abs_error < 1e-4 and accuracy.data == "calibration"
    with pytest.warns(DeprecationWarning):
        scripted = torch.jit.script(model)
    assert spec_from_torch(scripted).describe() == spec.describe()


@pytest.mark.parametrize(
    "model, reason",
    [
        (nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), r"layer 1 \(LayerNorm\) is not supported"),
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.ReLU()), "must directly follow a Linear"),
        (nn.Sequential(nn.Linear(4, 4), nn.GELU(approximate="tanh")), "exact \\(erf\\) GELU"),
        (nn.Sequential(nn.ReLU()), "must directly follow a Linear"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.BatchNorm1d(4)), "no Linear layer to fold"),
        (nn.Linear(4, 4), "only an nn.Sequential"),
    ],
)
def test_unsupported_models_are_refused_with_the_reason(model, reason):
    with pytest.raises(ConversionError, match=reason):
        convert(model.eval(), rows(8, 4))


def test_model_whose_forward_is_not_a_chain_is_refused():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(6, 6), nn.ReLU())

        def forward(self, x):
            return self.body(x) + x

    with pytest.raises(ConversionError, match="plain chain"):
        convert(Residual().eval(), rows(64, 6))


def test_quantize_package_int8_and_backend_without_torch(torch_package, tmp_path):
    calibration = rows(1024, 32, seed=3)
    out = tmp_path / "mlp-int8"
    package, accuracy = quantize_package(torch_package.path, out, calibration, precision="int8")
    assert accuracy.max_abs_error < 5e-3
    assert package.platform == "native_mlp" and package.version == "1-int8"
    assert package.metadata["lineage"]["quantized_from"] == "mlp/1"
    assert package.metadata["accuracy"]["rows"] == 1024
    assert [t.to_json() for t in package.inputs] == [t.to_json() for t in torch_package.inputs]
    backend = NativeMLPBackend(out)
    x = rows(100, 32, seed=4)
    (y,) = backend.run([x])
    assert y.shape == (100, 1) and np.abs(y - torch_out(reference_model(), x)).max() < 5e-3
    buffer = np.empty((100, 1), np.float32)
    backend.run_into(x, buffer)
    np.testing.assert_array_equal(buffer, y)
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        from vivace.engine.native import NativeMLPBackend
        backend = NativeMLPBackend({str(out)!r})
        (y,) = backend.run([np.zeros((3, 32), np.float32)])
        assert y.shape == (3, 1)
        assert "torch" not in sys.modules, "the native backend imported torch"
        print(backend.level)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_static_scales_package_and_batch_executor(torch_package, tmp_path):
    out = tmp_path / "static"
    package, accuracy = quantize_package(torch_package, out, rows(1024, 32, 5), activation_scales="static")
    assert package.parameters["activation_scales"] == "static" and accuracy.rows == 512
    backend = NativeMLPBackend(package)
    max_batch = package.max_batch_size
    ins = [[memoryview(bytearray(max_batch * 32 * 4))] for _ in range(2)]
    outs = [[memoryview(bytearray(max_batch * 4))] for _ in range(2)]
    execute = backend.batch_executor(ins, outs)
    x = rows(5, 32, 6)
    np.frombuffer(ins[1][0], np.float32)[: x.size] = x.ravel()
    execute(1, 5)
    np.testing.assert_array_equal(np.frombuffer(outs[1][0], np.float32)[:5], backend.run([x])[0].ravel())


def test_accuracy_gate_refuses_and_writes_nothing(torch_package, tmp_path):
    out = tmp_path / "too-strict"
    with pytest.raises(ConversionError, match=r"not accurate enough: max abs error .* > tolerance 1e-07"):
        quantize_package(torch_package, out, None, precision="int8", tolerance=1e-7)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_calibration_and_platforms(torch_package, tmp_path):
    with pytest.raises(ConversionError, match=r"shape \[rows, 32\], got \[10, 31\]"):
        quantize_package(torch_package, tmp_path / "a", rows(10, 31))
    bad = rows(10, 32)
    bad[3, 3] = np.nan
    with pytest.raises(ConversionError, match="NaN or Inf"):
        quantize_package(torch_package, tmp_path / "b", bad)
    native, _ = quantize_package(torch_package, tmp_path / "native", None, precision="fp32")
    with pytest.raises(ConversionError, match="already a native package"):
        quantize_package(native, tmp_path / "c")
    with pytest.raises(PackageError, match="is not 'native_mlp'"):
        NativeMLPBackend(torch_package)


def test_corrupted_native_package_is_refused(torch_package, tmp_path):
    native, _ = quantize_package(torch_package, tmp_path / "n", None, precision="int8")
    (native.path / "model.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(PackageError, match="model.npz is corrupted"):
        NativeMLPBackend(native.path)
    manifest = json.loads((native.path / "package.json").read_text())
    forged = write_package(tmp_path / "forged", manifest, {"model.npz": b"not a zip file"})
    with pytest.raises(PackageError, match="not a valid native MLP file"):
        NativeMLPBackend(forged.path)


def run_cli(argv: list[str], home) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", default=str(home))
    quantize_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return args.func(args)


def test_quantize_command(torch_package, tmp_path, capsys):
    calibration = tmp_path / "calib.npy"
    np.save(calibration, rows(512, 32, 7))
    out = tmp_path / "cli-int8"
    assert run_cli(["quantize", str(torch_package.path), "--out", str(out), "--calibration", str(calibration),
                    "--int8"], tmp_path / "home") == 0
    assert "max abs error" in capsys.readouterr().out
    assert load_package(out).parameters["precision"] == "int8"
    assert run_cli(["quantize", str(torch_package.path), "--out", str(out), "--int8"], tmp_path / "home") == 1
    assert "already exists" in capsys.readouterr().err
    np.save(calibration, rows(5, 3))
    assert run_cli(["quantize", str(torch_package.path), "--out", str(tmp_path / "x"), "--calibration",
                    str(calibration)], tmp_path / "home") == 1
    assert "shape [rows, 32]" in capsys.readouterr().err
    assert run_cli(["quantize", "nosuchmodel@production", "--out", str(tmp_path / "y")], tmp_path / "home") == 1
    assert "error" in capsys.readouterr().err


def test_quantize_command_registers_a_version_with_lineage(torch_package, tmp_path, capsys):
    from vivace.registry.models import get_version, register_model

    home = tmp_path / "home"
    register_model(home, torch_package.path, "mlp")
    assert run_cli(["quantize", "mlp/1", "--int8", "--register"], home) == 0
    assert "registered mlp/2" in capsys.readouterr().out
    version = get_version(home, "mlp/2")
    assert version.tags["quantized_from"] == "mlp/1"
    assert version.metrics["quantize_max_abs_error"] < 5e-3


def test_quantize_certifies_on_the_packages_reference_data_not_only_on_unit_normal_rows(tmp_path):
    """Issue 14: a 64-512-512-8 model passed the int8 gate on N(0,1) rows while inputs of
    scale 3, its real data, are ~3x less accurate. With a reference profile the gate draws
    its rows from the profile and says so; without one it still says N(0,1)."""
    from vivace.monitor.drift import build_profile
    from vivace.profile import dumps
    from vivace.registry.packaging import package_torch_model

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 8)).eval()
    data = 3.0 * rows(4000, 64, seed=5)
    (tmp_path / "profile.json").write_text(dumps(build_profile(data)))
    plain = package_torch_model(model, tmp_path / "plain", name="m", example=torch.zeros(2, 64))
    profiled = package_torch_model(model, tmp_path / "profiled", name="m", example=torch.zeros(2, 64),
                                   profile=tmp_path / "profile.json")
    _, on_normal = quantize_package(plain, tmp_path / "q-plain", precision="int8", tolerance=1.0)
    _, on_profile = quantize_package(profiled, tmp_path / "q-profiled", precision="int8", tolerance=1.0)
    assert on_normal.data == "synthetic N(0,1)"
    assert on_profile.data == "reference-profile (profile.json)"
    # what the profile certifies is what the real data shows; N(0,1) understates it
    real = np.abs(NativeMLPBackend(load_package(tmp_path / "q-profiled")).run([data])[0] - torch_out(model, data)).max()
    assert on_profile.max_abs_error > 0.5 * real
    assert on_normal.max_abs_error < 0.6 * on_profile.max_abs_error
    # a tolerance the N(0,1) rows meet but the real data does not: refused, naming the data
    tolerance = float(np.sqrt(on_normal.max_abs_error * on_profile.max_abs_error))
    with pytest.raises(ConversionError, match="reference-profile"):
        quantize_package(profiled, tmp_path / "refused", precision="int8", tolerance=tolerance)
    assert not (tmp_path / "refused").exists()
