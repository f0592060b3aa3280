"""`vivace bench kernels`: Vivace's native MLP, called as users call it, against the
runtimes a user could pick instead, each in its strongest form, in the same run.

Rows/s at batch 1, 8, 32, 256 and 4096 for the reference MLP (32-256-256-1, sigmoid) and a
big one (512-1024-1024-1), with 1 and 2 threads. Vivace is timed through the documented
`Scorer.predict` (numpy in, numpy out) on packages written by `vivace quantize`: fp32,
int8 (per-row activation scales) and int8s (static scales calibrated on the rows given).
The peers: torch eager fp32, torch.jit frozen and optimised for inference, torch.ao
quantize_dynamic int8, and onnxruntime fp32, dynamic int8 and static int8 (QDQ,
calibrated on the same rows as int8s) with IOBinding into preallocated inputs and outputs.
The bare kernels (`forward_into`) are timed too, only to show what `Scorer` adds per call.
Each case is measured in `--repeat` windows, the runners interleaved window by window, and
the best window kept, so a burst of load elsewhere on the machine hits every runner alike.
Printed: the CPU and the ISA level the kernels use, rows/s, the ratio of the best Vivace
runner to the best peer per batch size, Scorer's overhead at batch 1, and max abs error
against torch fp32. A missing peer (onnxruntime, onnx) stops the benchmark with an error
rather than printing ratios against fewer peers.

`--emulate-cpu avx2` runs the whole benchmark in a child process that sees the CPU without
AVX-512, AVX-VNNI or AMX (the `_cpu_emulation` library traps CPUID, Linux with CPUID
faulting only), so every runtime takes the code paths it takes on an AVX2-only machine:
the ratios there are measured, not inferred, on an AVX-512 machine.

`--gpu` instead measures the reference MLP on a CUDA device: torch fp16 with CUDA graphs
against the fused Triton kernels (fp16, int8 W8A8, fp8 e4m3), each replayed from a CUDA
graph, at batch 1, 256, 4096 and 65,536.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np

BATCHES = (1, 8, 32, 256, 4096)
THREADS = (1, 2)
MODELS = {
    "reference": ("reference MLP 32-256-256-1", (32, 256, 256, 1)),
    "big": ("big MLP 512-1024-1024-1", (512, 1024, 1024, 1)),
}
ACCURACY_ROWS = 4096
VIVACE_PRECISIONS = {"vivace-fp32": ("fp32", "dynamic"), "vivace-int8": ("int8", "dynamic"),
                     "vivace-int8s": ("int8", "static")}


def build_torch_model(dims: tuple[int, ...]):
    import torch
    from torch import nn

    torch.manual_seed(0)
    layers: list[Any] = []
    for i, (fan_in, fan_out) in enumerate(zip(dims, dims[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        layers.append(nn.ReLU() if i < len(dims) - 2 else nn.Sigmoid())
    return nn.Sequential(*layers).eval()


def _onnx_bytes(model, dims: tuple[int, ...]) -> bytes:
    """The MLP as an ONNX graph built directly (Gemm + Relu/Sigmoid), no exporter needed."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, current = [], [], "x"
    linears = [m for m in model if hasattr(m, "weight")]
    for i, linear in enumerate(linears):
        w = numpy_helper.from_array(linear.weight.detach().numpy(), f"w{i}")
        b = numpy_helper.from_array(linear.bias.detach().numpy(), f"b{i}")
        inits += [w, b]
        nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [f"g{i}"], transB=1))
        op = "Relu" if i < len(linears) - 1 else "Sigmoid"
        current = "y" if i == len(linears) - 1 else f"a{i}"
        nodes.append(helper.make_node(op, [f"g{i}"], [current]))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", dims[-1]])], inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto.SerializeToString()


def _onnx_runners(model, dims: tuple[int, ...], threads: int, calibration: np.ndarray,
                  tmp: Path) -> dict[str, Callable]:
    """onnxruntime fp32, dynamic int8 and static int8 (QDQ, calibrated on the rows vivace's
    int8s is), input and output bound to preallocated arrays (IOBinding)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize_dynamic, quantize_static

    class Rows(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter(np.array_split(calibration, max(1, len(calibration) // 256)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.batches, None)
            return None if batch is None else {"x": batch}

    src, dynamic, static = tmp / "m.onnx", tmp / "q.onnx", tmp / "qs.onnx"
    src.write_bytes(_onnx_bytes(model, dims))
    quantize_dynamic(str(src), str(dynamic), weight_type=QuantType.QInt8)
    quantize_static(str(src), str(static), Rows(), weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    runners = {}
    for name, path in (("ort-fp32", src), ("ort-int8", dynamic), ("ort-int8s", static)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def factory(x: np.ndarray, session=session):
            out = np.empty((x.shape[0], dims[-1]), np.float32)
            binding = session.io_binding()
            binding.bind_input("x", "cpu", 0, np.float32, list(x.shape), x.ctypes.data)
            binding.bind_output("y", "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
            run = session.run_with_iobinding

            def call() -> np.ndarray:
                run(binding)
                return out
            return call
        runners[name] = factory
    return runners


def _vivace_packages(model, dims: tuple[int, ...], calibration: np.ndarray, tmp: Path) -> dict[str, Path]:
    """The model packaged (TorchScript), then converted by `vivace quantize` per precision."""
    import torch

    from vivace.engine.native.convert import quantize_package
    from vivace.registry.packaging import package_torch_model

    source = package_torch_model(model, tmp / "torch", name="mlp", example=torch.zeros(2, dims[0]),
                                 max_batch_size=max(BATCHES))
    return {name: quantize_package(source, tmp / name, rows=calibration, precision=precision,
                                   activation_scales=scales, tolerance=1.0)[0].path
            for name, (precision, scales) in VIVACE_PRECISIONS.items()}


def make_runners(model, dims: tuple[int, ...], threads: int, calibration: np.ndarray,
                 tmp: Path) -> tuple[dict[str, Callable], dict[str, Callable]]:
    """(runners, bare kernels): name -> factory(x) returning a zero-argument call that runs
    batch x once. The runners are what the ratios compare; the bare kernels show what
    Scorer adds on top of them."""
    import torch

    from vivace.engine import Scorer

    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qmodel = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(model)))

    def torch_runner(m):
        def factory(x: np.ndarray):
            t = torch.from_numpy(x)
            return lambda: m(t)
        return factory

    runners: dict[str, Callable] = {"torch-fp32": torch_runner(model), "torch-jit": torch_runner(frozen),
                                    "torch-int8": torch_runner(qmodel)}
    runners.update(_onnx_runners(model, dims, threads, calibration, tmp))
    kernels: dict[str, Callable] = {}
    for name, path in _vivace_packages(model, dims, calibration, tmp).items():
        scorer = Scorer(path, num_threads=threads)

        def factory(x: np.ndarray, predict=scorer.predict):
            return lambda: predict(x)
        runners[name] = factory
        forward_into = scorer.backend.forward_into

        def bare(x: np.ndarray, forward_into=forward_into):
            out = np.empty((x.shape[0], dims[-1]), np.float32)
            return lambda: forward_into(x, out)
        kernels[name.replace("vivace", "kernel")] = bare
    return runners, kernels


def rows_per_second(call: Callable[[], Any], batch: int, budget_s: float, clock: Callable[[], float]) -> float:
    """Rows per second of `clock` (wall: perf_counter; cpu: this process's CPU time) over one window."""
    call()  # warm-up
    start = time.perf_counter()
    call()
    single = time.perf_counter() - start
    reps = max(1, int(0.002 / max(single, 1e-9)))  # timing chunks of ~2 ms
    calls = 0
    wall_start, start = time.perf_counter(), clock()
    while time.perf_counter() - wall_start < budget_s or calls == 0:
        for _ in range(reps):
            call()
        calls += reps
    elapsed = clock() - start
    return batch * calls / max(elapsed, 1e-9)


def best_of_interleaved(calls: dict[str, Callable[[], Any]], batch: int, budget_s: float, repeat: int,
                        clock: Callable[[], float]) -> dict[str, float]:
    """Each call's best window of `repeat`, the calls taking turns (rotated every round)."""
    names = list(calls)
    best = dict.fromkeys(names, 0.0)
    for r in range(repeat):
        for name in names[r % len(names):] + names[:r % len(names)]:
            best[name] = max(best[name], rows_per_second(calls[name], batch, budget_s, clock))
    return best


def _output(result: Any) -> np.ndarray:
    if isinstance(result, list):
        result = result[0]
    if hasattr(result, "detach"):
        result = result.detach().numpy()
    return np.asarray(result)


def print_peak_share(dims: tuple[int, ...], batch: int, ours: float, peer: float) -> None:
    """How close the largest batch's rates come to this core's int8 multiply-add peak at the
    kernels' level: how much room any int8 kernel has left on this machine."""
    from vivace import _core

    level = _core.cpu_level()
    peak = _core.int8_peak(level)
    if peak is None:
        print(f"  int8 peak: no probe for the {level} level")
        return
    macs = sum(i * o for i, o in zip(dims, dims[1:]))
    print(f"  int8 peak of one core at the {level} level (its inner-loop instructions from registers): "
          f"{peak:.3g} multiply-adds/s. At batch {batch}: best vivace {ours * macs / peak:.0%} of it, best peer "
          f"{peer * macs / peak:.0%}; 1.5x the best peer would take {1.5 * peer * macs / peak:.0%}")


def run_benchmark(models: list[str], batches: tuple[int, ...], threads: tuple[int, ...], budget_s: float,
                  repeat: int, clock_name: str = "wall", emulated: str | None = None) -> None:
    """`emulated`: the CPU every runtime in this process has been checked to see (--emulate-cpu)."""
    import torch

    from .drift import cpu_description

    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    logging.getLogger().setLevel(logging.ERROR)  # onnxruntime.quantization's pre-processing advice
    print(f"vivace bench kernels: {cpu_description()}"
          + (f" (emulating an {emulated} CPU: CPUID trapped, features above it hidden from every runtime)"
             if emulated else "") + f"; best of {repeat} interleaved {budget_s:g} s windows per "
          f"case; {clock_name} clock; vivace = Scorer.predict (numpy in/out), ort = onnxruntime with IOBinding")
    for key in models:
        title, dims = MODELS[key]
        model = build_torch_model(dims)
        calibration = np.random.default_rng(2).standard_normal((1024, dims[0])).astype(np.float32)
        for n_threads in threads:
            with tempfile.TemporaryDirectory(prefix="vivace-bench-kernels-") as tmp:
                runners, kernels = make_runners(model, dims, n_threads, calibration, Path(tmp))
                names = list(runners)
                largest = (0, 0.0, 0.0)  # (batch, best vivace rows/s, best peer rows/s) at the largest batch
                print(f"\n{title}, {n_threads} thread(s): rows per {clock_name}-clock second")
                print(f"{'batch':>6} " + " ".join(f"{n:>12}" for n in names) + f" {'vivace/peer':>12}")
                with torch.inference_mode():
                    for batch in batches:
                        x = np.random.default_rng(batch).standard_normal((batch, dims[0])).astype(np.float32)
                        calls = {n: f(x) for n, f in {**runners, **kernels}.items()}
                        rates = best_of_interleaved(calls, batch, budget_s, repeat, clock)
                        peer = max(v for n, v in rates.items() if n in runners and not n.startswith("vivace"))
                        ours = max(v for n, v in rates.items() if n.startswith("vivace"))
                        largest = (batch, ours, peer) if batch >= largest[0] else largest
                        cells = " ".join(f"{rates[n]:>12.4g}" for n in names)
                        print(f"{batch:>6} {cells} {ours / peer:>11.2f}x", flush=True)
                        if batch == 1:
                            print(f"{'µs/call':>6} " + " ".join(f"{1e6 / rates[n]:>12.2f}" for n in names))
                            extra = {n: 1e6 / rates[n] - 1e6 / rates[n.replace("vivace", "kernel")]
                                     for n in VIVACE_PRECISIONS}
                            print("  Scorer.predict over the bare kernel at batch 1: "
                                  + ", ".join(f"{n.removeprefix('vivace-')} {us:+.2f} µs" for n, us in extra.items()))
                if n_threads == 1:
                    print_peak_share(dims, *largest)
                print(f"{title}, {n_threads} thread(s): max abs error against torch fp32 on {ACCURACY_ROWS} N(0,1) rows")
                x = np.random.default_rng(1).standard_normal((ACCURACY_ROWS, dims[0])).astype(np.float32)
                with torch.inference_mode():
                    reference = model(torch.from_numpy(x)).numpy()
                    print("  " + ", ".join(f"{name} {np.abs(_output(factory(x)()) - reference).max():.3g}"
                                           for name, factory in runners.items()))


def _graphed(fn: Callable[[], Any], torch) -> Callable[[], Any]:
    """`fn` captured in a CUDA graph (after a warm-up on a side stream); returns replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run_gpu_benchmark(batches: tuple[int, ...], budget_s: float) -> None:
    """Reference MLP on the GPU: torch fp16 with CUDA graphs against the fused Triton kernels."""
    import torch

    from vivace.engine.native.convert import spec_from_torch
    from vivace.engine.triton_kernels.mlp import TritonMLP

    title, dims = MODELS["reference"]
    model = build_torch_model(dims)
    spec = spec_from_torch(model)
    fp16_model = build_torch_model(dims).cuda().half()
    kernels = {p: TritonMLP(spec.weights, spec.biases, spec.activations, precision=p) for p in ("fp16", "int8", "fp8")}
    names = ["torch-fp16-graph"] + [f"triton-{p}-graph" for p in kernels]
    print(f"vivace bench kernels --gpu: {title} on {torch.cuda.get_device_name()}; rows/s")
    print(f"{'batch':>7} " + " ".join(f"{n:>17}" for n in names) + f" {'triton/torch':>13}")
    # The CPU accuracy table's rows, so the figures compare.
    x_check = torch.from_numpy(np.random.default_rng(1).standard_normal((ACCURACY_ROWS, dims[0])).astype(np.float32))
    with torch.inference_mode():
        for batch in batches:
            x = torch.randn(batch, dims[0], device="cuda")
            x16 = x.half()
            out = torch.empty(batch, dims[-1], device="cuda")
            calls = {"torch-fp16-graph": _graphed(lambda: fp16_model(x16), torch)}
            for p, mlp in kernels.items():
                calls[f"triton-{p}-graph"] = _graphed(lambda mlp=mlp: mlp.forward(x, out), torch)
            rates = {}
            for name, replay in calls.items():
                torch.cuda.synchronize()
                n, start = 0, time.perf_counter()
                while time.perf_counter() - start < budget_s:
                    for _ in range(10):
                        replay()
                    n += 10
                    torch.cuda.synchronize()
                rates[name] = batch * n / (time.perf_counter() - start)
            best = max(v for k, v in rates.items() if k.startswith("triton"))
            print(f"{batch:>7} " + " ".join(f"{rates[n]:>17.4g}" for n in names)
                  + f" {best / rates['torch-fp16-graph']:>12.2f}x")
        reference = model(x_check).numpy()
        print(f"max abs error against torch fp32 on {x_check.shape[0]} N(0,1) rows (seed 1):")
        fp16_out = fp16_model(x_check.cuda().half()).float().cpu().numpy()
        print(f"  {'torch-fp16':>12}: {np.abs(fp16_out - reference).max():.3g}")
        for p, mlp in kernels.items():
            got = mlp.forward(x_check.cuda()).cpu().numpy()
            print(f"  {'triton-' + p:>12}: {np.abs(got - reference).max():.3g}")


def register(subparsers) -> None:
    parser = subparsers.add_parser("kernels", help="native MLP kernels vs torch / onnxruntime (rows/s, accuracy)")
    parser.add_argument("--models", default="reference,big", help="comma list of: reference, big")
    parser.add_argument("--batches", default=",".join(map(str, BATCHES)))
    parser.add_argument("--threads", default=",".join(map(str, THREADS)))
    parser.add_argument("--seconds", type=float, default=0.05, help="length of one measuring window (default 0.05)")
    parser.add_argument("--repeat", type=int, default=5, help="windows per case, interleaved; the best is kept")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall",
        help="wall time, or this process's CPU time (steadier on a shared machine; meaningful for 1 thread)",
    )
    parser.add_argument(
        "--emulate-cpu", choices=["avx2"],
        help="run every runtime as on a CPU without AVX-512/VNNI/AMX (Linux x86-64 with CPUID faulting)",
    )
    parser.add_argument(
        "--gpu", action="store_true",
        help="instead: the fused Triton kernels against torch fp16 with CUDA graphs (needs CUDA and triton)",
    )
    parser.set_defaults(func=_run)


def _emulation_library() -> Path | None:
    import vivace

    return next(Path(vivace.__file__).parent.glob("_cpu_emulation*.so"), None)


def _run_emulated(args) -> int:
    """This benchmark again, in a child process whose CPUID hides what `args.emulate_cpu` lacks."""
    library = _emulation_library()
    if library is None:
        print("vivace bench kernels: error: --emulate-cpu needs vivace's _cpu_emulation library, "
              "built on x86-64 Linux only", file=sys.stderr)
        return 1
    preload = " ".join(filter(None, [str(library), os.environ.get("LD_PRELOAD")]))
    env = dict(os.environ, LD_PRELOAD=preload, VIVACE_EMULATE_CPU=args.emulate_cpu)
    argv = ["--models", args.models, "--batches", args.batches, "--threads", args.threads,
            "--seconds", str(args.seconds), "--repeat", str(args.repeat), "--clock", args.clock,
            "--emulate-cpu", args.emulate_cpu]
    code = subprocess.call([sys.executable, "-m", "vivace", "bench", "kernels", *argv], env=env)
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128 + N


def _emulation_failure(target: str) -> str | None:
    """Why the CPU this process sees is not `target`, if it is not (every runtime must agree)."""
    import torch

    from vivace import _core

    numpy_core = getattr(np, "_core", None) or np.core
    numpy_features = numpy_core._multiarray_umath.__cpu_features__
    numpy_level = "avx512" if numpy_features["AVX512F"] else "avx2" if numpy_features["AVX2"] else "below avx2"
    seen = {"vivace": _core.cpu_levels()[-1], "torch": torch.backends.cpu.get_cpu_capability().lower(),
            "numpy": numpy_level}
    wrong = {name: level for name, level in seen.items() if level != target}
    return f"the CPU does not look like {target} to every runtime: {wrong}" if wrong else None


def _run(args) -> int:
    models = [m for m in args.models.split(",") if m]
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        print(f"vivace bench kernels: error: unknown model(s) {unknown}; choose from {list(MODELS)}", file=sys.stderr)
        return 1
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
        threads = tuple(int(t) for t in args.threads.split(","))
    except ValueError:
        print("vivace bench kernels: error: --batches and --threads take comma-separated integers", file=sys.stderr)
        return 1
    if args.emulate_cpu and args.gpu:
        print("vivace bench kernels: error: --emulate-cpu is for the CPU benchmark, not --gpu", file=sys.stderr)
        return 1
    if args.emulate_cpu and os.environ.get("VIVACE_EMULATE_CPU") != args.emulate_cpu:
        return _run_emulated(args)
    if args.emulate_cpu and (failure := _emulation_failure(args.emulate_cpu)):
        print(f"vivace bench kernels: error: --emulate-cpu {args.emulate_cpu}: {failure}", file=sys.stderr)
        return 1
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("vivace bench kernels: error: --gpu needs a CUDA device", file=sys.stderr)
            return 1
        gpu_batches = batches if args.batches != ",".join(map(str, BATCHES)) else (1, 256, 4096, 65536)
        run_gpu_benchmark(gpu_batches, max(args.seconds, 0.2))
        return 0
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as exc:  # a missing peer: say so, never print ratios against fewer peers
        print(f"vivace bench kernels: error: the onnxruntime peer needs {exc.name} (pip install 'vivace[bench]')",
              file=sys.stderr)
        return 1
    run_benchmark(models, batches, threads, args.seconds, max(1, args.repeat), args.clock, args.emulate_cpu)
    return 0
