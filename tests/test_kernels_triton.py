"""Fused Triton MLP kernels (fp16, int8 W8A8, fp8 e4m3) against torch.

Without CUDA they run under the Triton interpreter (TRITON_INTERPRET=1) at small sizes;
with CUDA the same tests run on the device (the reference MLP at 65,536 rows).
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if not torch.cuda.is_available():
    # Must be set before triton is first imported: parts of it read it at import time.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vivace.engine.triton_kernels.mlp import TritonMLP  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {"fp16": 2e-3, "int8": 2e-2, "fp8": 8e-2}  # relative to the output's magnitude
FNS = {"identity": lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
       "sigmoid": torch.sigmoid, "tanh": torch.tanh}


def random_mlp(dims, seed=0):
    rng = np.random.default_rng(seed)
    weights = [(rng.standard_normal((o, i)) / np.sqrt(i)).astype(np.float32) for i, o in zip(dims, dims[1:])]
    biases = [(rng.standard_normal(o) * 0.1).astype(np.float32) for o in dims[1:]]
    return weights, biases


def reference(weights, biases, acts, x):
    h = x
    for w, b, a in zip(weights, biases, acts):
        h = FNS[a](torch.nn.functional.linear(h, torch.from_numpy(w), torch.from_numpy(b)))
    return h


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp8"])
@pytest.mark.parametrize(
    "dims, acts",
    [([32, 64, 48, 1], ["relu", "relu", "sigmoid"]), ([7, 33, 17, 3], ["gelu", "tanh", "identity"])],
)
def test_fused_mlp_matches_torch(precision, dims, acts):
    weights, biases = random_mlp(dims, seed=dims[0])
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((37, dims[0])).astype(np.float32))
    expected = reference(weights, biases, acts, x)
    mlp = TritonMLP(weights, biases, acts, precision=precision, device=DEVICE, block_m=16)
    got = mlp.forward(x).cpu()
    assert got.shape == (37, dims[-1]) and got.dtype == torch.float32
    scale = max(1.0, float(expected.abs().max()))
    assert float((got - expected).abs().max()) <= TOLERANCE[precision] * scale
    for rows in (1, 16, 17):  # a partial block, an exact block, one past it
        np.testing.assert_allclose(mlp.forward(x[:rows]).cpu(), got[:rows], rtol=0, atol=1e-6)
    assert mlp.forward(x[:0]).shape == (0, dims[-1])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy sees the NaN/Inf too
@pytest.mark.parametrize("precision", ["int8", "fp8"])
def test_non_finite_row_gives_nan_only_there(precision):
    weights, biases = random_mlp([16, 32, 16, 2], seed=3)
    mlp = TritonMLP(weights, biases, ["relu", "relu", "identity"], precision=precision, device=DEVICE, block_m=16)
    x = torch.from_numpy(np.random.default_rng(4).standard_normal((5, 16)).astype(np.float32))
    clean = mlp.forward(x).cpu()
    x[2, 7] = float("nan")
    x[3, 0] = float("inf")
    got = mlp.forward(x).cpu()
    assert torch.isnan(got[2]).all() and torch.isnan(got[3]).all()
    keep = [0, 1, 4]
    np.testing.assert_array_equal(got[keep], clean[keep])


def test_zero_rows_and_refusals():
    weights, biases = random_mlp([16, 32, 16, 1], seed=5)
    acts = ["relu", "relu", "sigmoid"]
    mlp = TritonMLP(weights, biases, acts, precision="int8", device=DEVICE, block_m=16)
    zeros = torch.zeros((3, 16))
    np.testing.assert_allclose(mlp.forward(zeros).cpu(), reference(weights, biases, acts, zeros), atol=2e-2)
    with pytest.raises(ValueError, match="exactly 3 Linear layers"):
        TritonMLP(weights[:2], biases[:2], acts[:2], device=DEVICE)
    wide, wide_b = random_mlp([16, 512, 16, 1])
    with pytest.raises(ValueError, match="at most 256 wide"):
        TritonMLP(wide, wide_b, acts, device=DEVICE)
    with pytest.raises(ValueError, match="precision"):
        TritonMLP(weights, biases, acts, precision="int4", device=DEVICE)
    with pytest.raises(ValueError, match=r"shape \[rows, 16\]"):
        mlp.forward(torch.zeros((2, 15)))


@pytest.mark.parametrize("precision", ["fp16", "int8", "fp8"])
def test_reference_mlp(precision):
    """The benchmark reference MLP: 65,536 rows on a GPU, 128 under the interpreter."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 1), torch.nn.Sigmoid()).eval()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    mlp = TritonMLP([m.weight.detach().numpy() for m in linears], [m.bias.detach().numpy() for m in linears],
                    ["relu", "relu", "sigmoid"], precision=precision, device=DEVICE)
    x = torch.randn(65536 if DEVICE == "cuda" else 128, 32)
    with torch.no_grad():
        expected = model(x)
    got = mlp.forward(x).cpu()
    assert float((got - expected).abs().max()) <= {"fp16": 2e-3, "int8": 5e-3, "fp8": 2e-2}[precision]
