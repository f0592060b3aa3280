"""The reference model: what `vivace demo` serves next to the churn model, what the
benchmarks load (`vivace bench model --out DIR` writes it) and what the tests serve.

torch.manual_seed(0); nn.Sequential(Linear(32,256), ReLU, Linear(256,256), ReLU,
Linear(256,1), Sigmoid) — input `input__0` FP32 [-1, 32], output `output__0` FP32 [-1, 1].
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path

from vivace.registry.package import ModelPackage, write_package

IN_FEATURES = 32


def reference_module():
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(IN_FEATURES, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1), nn.Sigmoid()
    ).eval()


def write_reference_model(
    out: str | Path, max_batch_size: int = 128, platform: str = "torchscript", overwrite: bool = False, **batching
) -> ModelPackage:
    """Write the reference MLP package to `out` (TorchScript by default, or torch_export)."""
    import torch

    module = reference_module()
    example = torch.zeros(1, IN_FEATURES)
    buffer = io.BytesIO()
    if platform == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.jit.save(torch.jit.trace(module, example), buffer)
        model_file = "model.pt"
    elif platform == "torch_export":
        batch = torch.export.Dim("batch", min=1, max=1 << 20)
        program = torch.export.export(module, (torch.zeros(2, IN_FEATURES),), dynamic_shapes=({0: batch},))
        torch.export.save(program, buffer)
        model_file = "model.pt2"
    else:
        raise ValueError(f"unknown platform {platform!r}")
    manifest = {
        "name": "mlp",
        "version": "1",
        "platform": platform,
        "model_file": model_file,
        "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, IN_FEATURES]}],
        "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}],
        "max_batch_size": max_batch_size,
        "dynamic_batching": batching,
        "parameters": {"torch_num_threads": 1},
        "metadata": {"description": "Vivace benchmark reference MLP 32-256-256-1 with sigmoid, seed 0"},
    }
    return write_package(out, manifest, {model_file: buffer.getvalue()}, overwrite=overwrite)

