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

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from vivace.engine.triton_kernels.mlp import TritonMLP, _round_to_e4m3  # noqa: E402

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
    """The benchmark's reference MLP on its accuracy rows: max abs error at the sigmoid output.

    5e-3 is the issue's tolerance for a sigmoid output; the rows and model are the ones
    `vivace bench kernels` reports (4,096 N(0,1) rows, seed 1).
    """
    from vivace.bench.kernels import ACCURACY_ROWS, MODELS, build_torch_model

    model = build_torch_model(MODELS["reference"][1])
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    mlp = TritonMLP([m.weight.detach().numpy() for m in linears], [m.bias.detach().numpy() for m in linears],
                    ["relu", "relu", "sigmoid"], precision=precision, device=DEVICE)
    x = torch.from_numpy(np.random.default_rng(1).standard_normal((ACCURACY_ROWS, 32)).astype(np.float32))
    with torch.no_grad():
        expected = model(x)
    got = mlp.forward(x).cpu()
    assert float((got - expected).abs().max()) <= {"fp16": 2e-3, "int8": 5e-3, "fp8": 5e-3}[precision]
    if DEVICE == "cuda":  # a serving-size batch: rows are independent, so its head gives the same outputs
        big = torch.cat([x, torch.randn(65536 - x.shape[0], 32)])
        np.testing.assert_array_equal(mlp.forward(big)[: x.shape[0]].cpu(), got)


@triton.jit
def _round_kernel(x_ptr, y_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(y_ptr + i, _round_to_e4m3(tl.load(x_ptr + i)).to(tl.float8e4nv).to(tl.float32))


def test_fp8_rounding_matches_torch_cast():
    """In-kernel fp32 -> e4m3 agrees with torch's cast over e4m3's normal range, mantissa carries included."""
    rng = np.random.default_rng(6)
    carries = [1.95, 7.9, 15.9, 3.95, -3.95, 447.0, 0.99, 2.0 ** -6, -448.0]
    values = np.concatenate([carries, np.sign(rng.standard_normal(1015)) * 2.0 ** rng.uniform(-6, np.log2(448), 1015)])
    x = torch.from_numpy(values.astype(np.float32))
    ties = (x.view(torch.int32) & 0xFFFFF) == 0x80000  # the kernel rounds half away from zero, torch to even
    y = torch.empty_like(x, device=DEVICE)
    _round_kernel[(1,)](x.to(DEVICE), y, N=x.numel())
    expected = x.to(torch.float8_e4m3fn).float()
    np.testing.assert_array_equal(y.cpu()[~ties], expected[~ties])


def test_fp8_two_term_layer_reconstructs_weights():
    weights, biases = random_mlp([32, 64, 48, 1], seed=8)
    mlp = TritonMLP(weights, biases, ["relu", "relu", "sigmoid"], precision="fp8", device=DEVICE, block_m=16)
    first, second = mlp.layers[0], mlp.layers[1]
    assert second.weight_lo is None and mlp.layers[2].weight_lo is None
    hi = (first.weight.float() * first.scale[None, :]).cpu()
    two_terms = ((first.weight.float() + first.weight_lo.float()) * first.scale[None, :]).cpu()
    exact = torch.from_numpy(weights[0].T)  # [32 in, 64 out]: no padding at these widths
    # One e4m3 term keeps 3 mantissa bits (error up to 2^-4 of a weight); two keep about 7.
    bound = float(exact.abs().max()) * 2.0 ** -8
    assert float((two_terms - exact).abs().max()) <= bound < float((hi - exact).abs().max())
