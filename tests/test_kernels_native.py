"""vivace._core.NativeMLP: every CPU level this machine has, fp32 and int8, against the
portable level, numpy and torch; adversarial inputs; saturation; threads; bad arguments."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from vivace import _core

torch = pytest.importorskip("torch")

LEVELS = _core.cpu_levels()
# The thread-pool tests run on the best level other than AMX, which its level tests cover.
POOL_LEVEL = LEVELS[-1] if LEVELS[-1] != "amx" else "avx512"
ACTIVATIONS = ["identity", "relu", "gelu", "sigmoid", "tanh"]


def random_mlp(dims: list[int], acts: list[str], seed: int = 0, scale: float = 1.0):
    rng = np.random.default_rng(seed)
    weights = [(rng.standard_normal((o, i)) * scale / np.sqrt(i)).astype(np.float32) for i, o in zip(dims, dims[1:])]
    biases = [(rng.standard_normal(o) * 0.1).astype(np.float32) for o in dims[1:]]
    return weights, biases, acts


def torch_forward(weights, biases, acts, x: np.ndarray) -> np.ndarray:
    fns = {"identity": lambda t: t, "relu": torch.relu, "gelu": torch.nn.functional.gelu,
           "sigmoid": torch.sigmoid, "tanh": torch.tanh}
    t = torch.from_numpy(x)
    with torch.no_grad():
        for w, b, a in zip(weights, biases, acts):
            t = fns[a](torch.nn.functional.linear(t, torch.from_numpy(w), torch.from_numpy(b)))
    return t.numpy()


def make(weights, biases, acts, precision="fp32", level="portable", **kw):
    return _core.NativeMLP(weights, biases, acts, precision=precision, level=level, **kw)


def test_levels_and_level_selection(monkeypatch):
    assert LEVELS[0] == "portable"
    assert _core.cpu_level("") == LEVELS[-1] or "VIVACE_CPU_LEVEL" in __import__("os").environ
    with pytest.raises(ValueError, match="unknown CPU level 'sse9'"):
        _core.cpu_level("sse9")
    for missing in {"avx2", "avx512", "amx"} - set(LEVELS):
        with pytest.raises(ValueError, match="not supported by this CPU"):
            make(*random_mlp([4, 3], ["relu"]), level=missing)
    monkeypatch.setenv("VIVACE_CPU_LEVEL", "portable")
    assert _core.NativeMLP(*random_mlp([4, 3], ["relu"])).level == "portable"
    monkeypatch.setenv("VIVACE_CPU_LEVEL", "bogus")
    with pytest.raises(ValueError, match="unknown CPU level 'bogus'"):
        _core.NativeMLP(*random_mlp([4, 3], ["relu"]))


def test_int8_peak_probe():
    for level in LEVELS:
        peak = _core.int8_peak(level)
        if level in ("avx2", "avx512"):
            # At least one multiply-add per ns: any CPU with these units does far more.
            assert isinstance(peak, float) and 1e9 < peak < float("inf"), (level, peak)
        else:
            assert peak is None, (level, peak)
    with pytest.raises(ValueError, match="unknown CPU level 'sse9'"):
        _core.int8_peak("sse9")
    for missing in {"avx2", "avx512", "amx"} - set(LEVELS):
        with pytest.raises(ValueError, match="not supported by this CPU"):
            _core.int8_peak(missing)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dims", [[1, 1], [7, 17, 3], [33, 65, 1], [257, 255, 31, 2], [32, 256, 256, 1]])
def test_fp32_matches_torch(level, dims):
    acts = (["relu"] * (len(dims) - 2)) + ["sigmoid"]
    mlp = random_mlp(dims, acts, seed=len(dims) + dims[0])
    x = np.random.default_rng(1).standard_normal((45, dims[0])).astype(np.float32)
    expected = torch_forward(*mlp, x)
    native = make(*mlp, level=level)
    np.testing.assert_allclose(native.forward(x), expected, rtol=1e-5, atol=1e-5)
    # Every batch size through the row blocks and tails gives the same rows.
    for rows in (1, 2, 3, 5, 6, 7, 13):
        np.testing.assert_allclose(native.forward(x[:rows]), expected[:rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_every_activation(level, act):
    mlp = random_mlp([9, 40, 20], [act, act], seed=3)
    x = np.random.default_rng(2).standard_normal((19, 9)).astype(np.float32) * 3
    expected = torch_forward(*mlp, x)
    np.testing.assert_allclose(make(*mlp, level=level).forward(x), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(make(*mlp, "int8", level=level).forward(x) - expected).max() < 0.05 * max(1.0, np.abs(expected).max())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("dims", [[1, 5], [7, 33, 3], [33, 257, 1], [257, 64, 7], [32, 256, 256, 1]])
def test_int8_matches_portable_and_stays_close_to_fp32(level, dims):
    acts = (["relu"] * (len(dims) - 2)) + ["identity"]
    mlp = random_mlp(dims, acts, seed=dims[0])
    x = np.random.default_rng(4).standard_normal((50, dims[0])).astype(np.float32)
    reference = make(*mlp, "int8", level="portable").forward(x)
    got = make(*mlp, "int8", level=level).forward(x)
    # Integer products are exact at every level; only the float epilogue may round apart
    # (and, rarely, flip one quantisation step of a hidden activation).
    scale = np.abs(reference).max()
    np.testing.assert_allclose(got, reference, atol=2e-3 * scale, rtol=0)
    fp32 = torch_forward(*mlp, x)
    assert np.abs(got - fp32).max() < 0.03 * np.abs(fp32).max()


@pytest.mark.parametrize("level", LEVELS)
def test_reference_mlp_int8_accuracy(level):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256),
                                torch.nn.ReLU(), torch.nn.Linear(256, 1), torch.nn.Sigmoid()).eval()
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    weights = [m.weight.detach().numpy() for m in linears]
    biases = [m.bias.detach().numpy() for m in linears]
    x = np.random.default_rng(5).standard_normal((2000, 32)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    got = make(weights, biases, ["relu", "relu", "sigmoid"], "int8", level=level).forward(x)
    assert np.abs(got - expected).max() < 5e-3


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_zero_and_huge_inputs(level, precision):
    mlp = random_mlp([33, 65, 4], ["relu", "identity"], seed=6)
    native = make(*mlp, precision, level=level)
    zeros = np.zeros((3, 33), np.float32)
    expected = torch_forward(*mlp, zeros)
    tol = 1e-5 if precision == "fp32" else 0.01  # int8: the hidden relu(bias) row is still quantised
    np.testing.assert_allclose(native.forward(zeros), expected, rtol=0, atol=tol * np.abs(expected).max())
    huge = np.random.default_rng(7).standard_normal((9, 33)).astype(np.float32) * np.float32(1e30)
    expected = torch_forward(*mlp, huge)
    got = native.forward(huge)
    assert np.isfinite(got).all()
    assert np.abs(got - expected).max() <= tol * np.abs(expected).max()


@pytest.mark.parametrize("level", LEVELS)
def test_nan_and_inf_fp32_follow_torch(level):
    mlp = random_mlp([7, 17, 3], ["relu", "sigmoid"], seed=8)
    x = np.random.default_rng(9).standard_normal((6, 7)).astype(np.float32)
    x[1, 3] = np.nan
    x[2, 0] = np.inf
    x[3, 6] = -np.inf
    got = make(*mlp, level=level).forward(x)
    np.testing.assert_allclose(got, torch_forward(*mlp, x), rtol=1e-5, atol=1e-6, equal_nan=True)
    assert np.isnan(got[1]).all()


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("static", [False, True])
def test_nan_and_inf_int8_poison_only_their_row(level, static):
    mlp = random_mlp([33, 40, 2], ["relu", "identity"], seed=10)
    ranges = [(-4.0, 4.0), (0.0, 6.0)] if static else None
    native = make(*mlp, "int8", level=level, input_ranges=ranges)
    x = np.random.default_rng(11).standard_normal((8, 33)).astype(np.float32)
    clean = native.forward(x)
    bad = x.copy()
    bad[2, 32] = np.nan
    bad[5, 0] = np.inf
    bad[6, 16] = -np.inf
    got = native.forward(bad)
    assert np.isnan(got[[2, 5, 6]]).all()
    keep = [0, 1, 3, 4, 7]
    np.testing.assert_array_equal(got[keep], clean[keep])


@pytest.mark.parametrize("level", LEVELS)
def test_int8_static_hidden_layers_quantised_in_the_epilogue(level):
    # Where a level quantises a layer's outputs for the next layer's static range in its
    # GEMM epilogue (AVX-512), the bits must be those of storing the outputs and quantising
    # them, which a batch split by columns still does; a NaN row stays NaN, alone.
    # ~0.96M multiply-adds per row: 2-40 rows are split by columns (so 2-3 rows also check
    # the kernel's 8-panel blocks against Quantize), 100 rows by rows.
    dims, acts = [600, 1000, 333, 70, 3], ["relu", "identity", "relu", "sigmoid"]
    mlp = random_mlp(dims, acts, seed=19)
    rng = np.random.default_rng(20)
    calibration = rng.standard_normal((256, dims[0])).astype(np.float32)
    hidden, t = [], torch.from_numpy(calibration)
    with torch.no_grad():
        for (w, b), a in zip(zip(mlp[0], mlp[1]), acts):
            hidden.append(t.numpy())
            t = torch.nn.functional.linear(t, torch.from_numpy(w), torch.from_numpy(b))
            t = torch.relu(t) if a == "relu" else torch.sigmoid(t) if a == "sigmoid" else t
    # 1st-99th percentiles: some values saturate at either end.
    ranges = [(float(np.percentile(h, 1)), float(np.percentile(h, 99))) for h in hidden]
    single = make(*mlp, "int8", level=level, input_ranges=ranges)
    pooled = make(*mlp, "int8", level=level, input_ranges=ranges, num_threads=3)
    for rows in (1, 2, 3, 4, 9, 13, 40, 100):
        x = rng.standard_normal((rows, dims[0])).astype(np.float32)
        np.testing.assert_array_equal(pooled.forward(x), single.forward(x), err_msg=f"{rows} rows")
    x = rng.standard_normal((13, dims[0])).astype(np.float32)
    clean = single.forward(x)
    x[[3, 7], [5, 299]] = [np.nan, np.inf]
    got = single.forward(x)
    assert np.isnan(got[[3, 7]]).all()
    keep = [r for r in range(13) if r not in (3, 7)]
    np.testing.assert_array_equal(got[keep], clean[keep])
    np.testing.assert_allclose(got[keep], torch_forward(*mlp, x[keep]), atol=0.05)


@pytest.mark.parametrize("level", LEVELS)
def test_int8_static_hidden_overflow_poisons_its_row(level):
    # A hidden output that overflows to +Inf (one channel of huge weights, rows at the top of
    # the input range) makes its row NaN whether the epilogue quantises it or Quantize does.
    weights, biases, acts = random_mlp([300, 1000, 333, 3], ["relu", "relu", "identity"], seed=22)
    weights[0][0, :] = 5e35  # its sum, 1.5e38, still fits float32; 255 steps of it times 300 do not
    ranges = [(0.0, 4.0), (0.0, 8.0), (0.0, 8.0)]
    single = make(weights, biases, acts, "int8", level=level, input_ranges=ranges)
    pooled = make(weights, biases, acts, "int8", level=level, input_ranges=ranges, num_threads=3)
    x = np.abs(np.random.default_rng(23).standard_normal((9, 300))).astype(np.float32)
    x[[2, 6]] = 4.0
    got = single.forward(x)
    assert np.isnan(got[[2, 6]]).all() and np.isfinite(np.delete(got, [2, 6], axis=0)).all()
    np.testing.assert_array_equal(pooled.forward(x), got)  # 9 rows: split by columns, nothing fused
    np.testing.assert_array_equal(pooled.forward(x[:3]), got[:3])  # 3 rows: 8-panel blocks when fused


@pytest.mark.parametrize("level", LEVELS)
def test_int8_static_ranges_saturate(level):
    mlp = random_mlp([7, 33, 1], ["relu", "identity"], seed=12)
    native = make(*mlp, "int8", level=level, input_ranges=[(-1.0, 1.0), (0.0, 3.0)])
    x = np.random.default_rng(13).standard_normal((40, 7)).astype(np.float32) * 10
    np.testing.assert_array_equal(native.forward(x), native.forward(np.clip(x, -1.0, 1.0)))
    dynamic = make(*mlp, "int8", level=level).forward(x)
    assert np.abs(dynamic - torch_forward(*mlp, x)).max() < np.abs(native.forward(x) - torch_forward(*mlp, x)).max()


@pytest.mark.parametrize("level", LEVELS)
def test_int8_weight_outliers_and_constant_rows(level):
    weights, biases, acts = random_mlp([64, 16, 3], ["relu", "identity"], seed=14)
    weights[0][:, 0] = 50.0  # each output channel's scale is set by one outlier weight
    native = make(weights, biases, acts, "int8", level=level)
    x = np.full((5, 64), 0.25, np.float32)  # constant rows: zero-width range, exact
    expected = torch_forward(weights, biases, acts, x)
    np.testing.assert_allclose(native.forward(x), expected, rtol=0, atol=0.02 * np.abs(expected).max())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_int8_full_scale_pairs_do_not_saturate(level, sign):
    # Every weight of a channel at its extreme and every activation at the top of its row's
    # range: the largest sums a pair of products can reach. AVX2's VPMADDUBSW saturates a
    # pair's sum to int16 unless the weights are quantised within the pair bound.
    k = 64
    weights = [np.full((16, k), sign, np.float32), np.eye(3, 16, dtype=np.float32)]
    weights[0][:, 1::2] *= 0.9  # unequal pairs: both round toward the bound
    weights[0][:8, 0] *= 0.5  # odd channels too
    biases = [np.zeros(16, np.float32), np.zeros(3, np.float32)]
    x = np.full((6, k), 2.0, np.float32)
    x[:, 5] = -1.0  # a row's range: every other input quantises to 255
    x[3] = np.linspace(-1.0, 2.0, k, dtype=np.float32)
    expected = torch_forward(weights, biases, ["identity", "identity"], x)
    got = make(weights, biases, ["identity", "identity"], "int8", level=level).forward(x)
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3 * np.abs(expected).max())
    portable = make(weights, biases, ["identity", "identity"], "int8", level="portable").forward(x)
    np.testing.assert_allclose(got, portable, rtol=1e-6, atol=1e-6 * np.abs(expected).max())


def test_int8_extreme_weight_channels():
    # A channel of weights under ~1e-36 cannot carry a float scale: it counts as zero, at
    # every level alike (it used to quantise its zeros to -127 and flip the output's sign).
    weights = [np.full((8, 16), 0.5, np.float32)]
    weights[0][0] = 0.0
    weights[0][0, 0], weights[0][0, 2] = 1e-37, 2e-37
    x = (np.linspace(0, 1, 16, dtype=np.float32) * np.float32(1e30))[None, :].copy()
    for level in LEVELS:
        got = make(weights, [np.zeros(8, np.float32)], ["identity"], "int8", level=level).forward(x)
        assert got[0, 0] == 0.0, (level, got[0, 0])
        np.testing.assert_allclose(got[0, 1:], x.sum() * 0.5, rtol=1e-2)
    # Weights whose sum overflows float32 cannot be int8 at all: said so, not NaN outputs.
    weights[0][1, :2] = 2e38
    with pytest.raises(ValueError, match="layer 0: output 1: weights too large for int8"):
        make(weights, [np.zeros(8, np.float32)], ["identity"], "int8")


def test_int8_weights_quantise_alike_under_another_rounding_mode():
    # The caller's floating-point rounding mode must not push a weight pair past the bound
    # AVX2 relies on (0.7, 0.7 both rounded up: 65 + 65): every level still agrees.
    import ctypes
    import ctypes.util

    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    weights = [np.zeros((8, 8), np.float32)]
    weights[0][0, :2] = 0.7
    weights[0][1] = 0.7
    x = np.ones((1, 8), np.float32)
    x[0, 2] = 0.0  # the row's range puts inputs 0 and 1 at 255
    fe_upward = 0x800  # x86 <fenv.h>
    assert libm.fesetround(fe_upward) == 0
    try:
        models = {level: make(weights, [np.zeros(8, np.float32)], ["identity"], "int8", level=level)
                  for level in LEVELS}
    finally:
        libm.fesetround(0)
    outputs = {level: model.forward(x) for level, model in models.items()}
    for level, got in outputs.items():
        np.testing.assert_allclose(got, outputs["portable"], rtol=1e-6, err_msg=level)
        np.testing.assert_allclose(got[0, :2], [1.4, 4.9], rtol=2e-3, err_msg=level)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_concurrent_callers_and_threads_agree(precision):
    mlp = random_mlp([32, 256, 256, 1], ["relu", "relu", "sigmoid"], seed=15)
    level = POOL_LEVEL
    single = make(*mlp, precision, level=level)
    pooled = make(*mlp, precision, level=level, num_threads=2)
    rng = np.random.default_rng(16)
    batches = [rng.standard_normal((n, 32)).astype(np.float32) for n in (1, 7, 55, 130, 700)]
    expected = [single.forward(b) for b in batches]
    for b, e in zip(batches, expected):
        np.testing.assert_array_equal(pooled.forward(b), e)
    errors: list[str] = []

    def worker(seed: int) -> None:
        outs = [np.empty((b.shape[0], 1), np.float32) for b in batches]
        for it in range(60):
            i = (seed + it) % len(batches)
            model = pooled if it % 2 else single
            model.forward_into(batches[i], outs[i])
            if not np.array_equal(outs[i], expected[i]):
                errors.append(f"thread {seed} iteration {it} batch {i}")

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_wide_models_split_small_batches_across_threads():
    # ~0.5M MACs per row: a few rows are split by output columns (every part computes a
    # share of each layer's outputs, tails, a dot layer and non-fused activations included),
    # more rows by rows; every split must give the single-threaded result bit for bit.
    rng = np.random.default_rng(18)
    level = POOL_LEVEL
    shapes = [([512, 1024, 8], ["relu", "identity"]),
              ([512, 1000, 3, 1000, 5], ["gelu", "tanh", "sigmoid", "identity"])]
    for seed, (dims, acts) in enumerate(shapes):
        mlp = random_mlp(dims, acts, seed=17 + seed)
        for precision in ("fp32", "int8"):
            single = make(*mlp, precision, level=level)
            pooled = make(*mlp, precision, level=level, num_threads=3)
            for rows in (1, 2, 5, 9, 13, 40, 100):
                x = rng.standard_normal((rows, dims[0])).astype(np.float32)
                np.testing.assert_array_equal(pooled.forward(x), single.forward(x),
                                              err_msg=f"{dims} {precision} {rows} rows")


def test_pooled_model_still_runs_in_a_forked_child():
    # A fork copies the model but not its helper threads: the child's caller must do the
    # whole batch itself, and drop the model, without waiting for helpers that do not exist.
    mlp = random_mlp([512, 1024, 8], ["relu", "identity"], seed=19)
    level = POOL_LEVEL
    pooled = make(*mlp, "int8", level=level, num_threads=2)
    x = np.random.default_rng(20).standard_normal((200, 512)).astype(np.float32)
    expected = [pooled.forward(x[:rows]) for rows in (4, 200)]  # split by columns, by rows
    time.sleep(0.05)  # the parent's helpers stop spinning and sleep on the pool's condition
    pid = os.fork()
    if pid == 0:
        same = all(np.array_equal(pooled.forward(x[:e.shape[0]]), e) for e in expected)
        del pooled  # its pool's destructor must not wait for the parent's helpers either
        os._exit(0 if same else 1)
    code = wait_for_child(pid, 30)
    assert code is not None, "a forked child hung on the parent's helper threads"
    assert code == 0, "the child computed different outputs"


def test_forked_child_with_its_own_threads_drops_a_pooled_model():
    # A forked child reuses the parent's thread ids for threads it starts itself: dropping
    # the copied pool must not touch those (it used to detach them, then abort on a join).
    mlp = random_mlp([64, 64], ["identity"], seed=23)
    pooled = make(*mlp, num_threads=4)
    pid = os.fork()
    if pid == 0:
        release = threading.Event()
        workers = [threading.Thread(target=release.wait) for _ in range(3)]
        for worker in workers:
            worker.start()
        del pooled
        release.set()
        for worker in workers:
            worker.join()
        os._exit(0)
    code = wait_for_child(pid, 30)
    assert code == 0, f"the child ended with {code} (negative: killed by that signal)"


def wait_for_child(pid: int, seconds: float) -> int | None:
    """The child's exit code, or None when it is still running after `seconds` (then killed)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.001)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a child as an unused uid with a thread limit (needs root)")
def test_a_refused_helper_thread_is_an_error_not_an_abort():
    # The OS may refuse a thread (ulimit -u, cgroup pids.max). With helpers already started,
    # a bare std::thread failure used to abort the whole process.
    script = """
import os, resource, sys
import numpy as np
from vivace import _core
weights = [np.ones((8, 4), np.float32)]
os.setgid(54321)
os.setuid(54321)  # a uid nothing else runs as: the limit counts only this process's threads
threads = int(next(l for l in open("/proc/self/status") if l.startswith("Threads:")).split()[1])
resource.setrlimit(resource.RLIMIT_NPROC, (threads + 1, threads + 1))  # room for one helper
try:
    _core.NativeMLP(weights, [np.zeros(8, np.float32)], ["identity"], num_threads=4)
except RuntimeError as e:
    print(e)
    sys.exit(3)
"""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 3, (result.returncode, result.stderr[-2000:])
    assert "num_threads=4: could not start the helper threads" in result.stdout


def test_buffers_shapes_and_errors():
    mlp = random_mlp([5, 8, 2], ["relu", "identity"], seed=17)
    native = make(*mlp)
    assert (native.in_features, native.out_features, native.num_layers, native.macs_per_row) == (5, 2, 2, 56)
    x = np.random.default_rng(18).standard_normal((4, 5)).astype(np.float32)
    out = np.empty((4, 2), np.float32)
    native.forward_into(x, out)
    np.testing.assert_array_equal(out, native.forward(x))
    np.testing.assert_array_equal(native.forward(x[0]), native.forward(x[:1]))  # 1-D: one row
    assert native.forward(np.empty((0, 5), np.float32)).shape == (0, 2)
    native.forward_into(memoryview(x), memoryview(out))
    with pytest.raises(TypeError, match="float32"):
        native.forward(x.astype(np.float64))
    with pytest.raises(TypeError, match="C-contiguous"):
        native.forward(np.asfortranarray(np.ones((4, 5), np.float32)))
    with pytest.raises(ValueError, match=r"shape \[rows, 5\], got \(4, 6\)"):
        native.forward(np.ones((4, 6), np.float32))
    with pytest.raises(ValueError, match="out has 3 rows, x has 4"):
        native.forward_into(x, np.empty((3, 2), np.float32))
    readonly = np.empty((4, 2), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(TypeError, match="writable"):
        native.forward_into(x, readonly)
    w, b, a = mlp
    with pytest.raises(ValueError, match="layer 1: in_features 8 does not match|does not match"):
        make([w[0], np.ones((2, 7), np.float32)], b, a)
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        make(w, b, ["swish", "relu"])
    with pytest.raises(ValueError, match="NaN or Inf"):
        make([np.full((8, 5), np.nan, np.float32), w[1]], b, a)
    with pytest.raises(ValueError, match="num_threads"):
        make(w, b, a, num_threads=0)
    with pytest.raises(ValueError, match="precision 'int8' only"):
        make(w, b, a, input_ranges=[(0.0, 1.0), None])
    for bad_range in [(-3e38, 3e38), (0.0, 1e-39)]:  # the width overflows; 255 / width overflows
        with pytest.raises(ValueError, match="too wide or too narrow"):
            make(w, b, a, "int8", input_ranges=[bad_range, None])
    make(w, b, a, "int8", input_ranges=[(1.0, 1.0), None])  # zero width: a constant input is fine
    with pytest.raises(ValueError, match="unknown precision"):
        make(w, b, a, precision="int4")
    with pytest.raises(ValueError, match="one entry per layer"):
        make(w, b, ["relu"])


def test_raw_entry_point_through_capsules():
    import ctypes

    get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
    get_pointer.restype = ctypes.c_void_p
    get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
    native = make(*random_mlp([9, 20, 2], ["relu", "identity"], seed=19), "int8", level=LEVELS[-1])
    model = get_pointer(native.native_handle(), b"vivace.kernels.NativeMlp")
    forward = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p)(
        get_pointer(_core.NATIVE_MLP_FORWARD, b"vivace.kernels.native_mlp_forward")
    )
    x = np.random.default_rng(20).standard_normal((11, 9)).astype(np.float32)
    out = np.zeros((11, 2), np.float32)
    assert forward(model, x.ctypes.data, 11, out.ctypes.data) == 0  # ctypes releases the GIL around it
    np.testing.assert_array_equal(out, native.forward(x))
