"""`vivace quantize SOURCE`: convert a torch MLP package into a native fp32/int8 package.

SOURCE is a package directory or a registry reference (name@alias, name/3, name).
The result is written to --out, and with --register added to the registry as the next
version of the model, with its lineage and accuracy.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

from vivace.registry.package import PackageError, load_package

from .convert import DEFAULT_TOLERANCE, ConversionError, quantize_package


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="convert a torch MLP package to the native fp32/int8 backend",
        description=__doc__,
    )
    parser.add_argument("source", help="package directory, or registry reference name@alias / name/N / name")
    parser.add_argument("--out", help="directory for the native package (required unless --register)")
    parser.add_argument("--calibration", help=".npy float array [rows, features]: calibration/holdout rows")
    parser.add_argument("--int8", action="store_true", help="int8 weights and activations (default: fp32)")
    parser.add_argument(
        "--activation-scales", choices=["dynamic", "static"], default="dynamic",
        help="int8 activation scales: per row at run time (default) or calibrated once",
    )
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"max abs error allowed against fp32 torch (default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--version", help="package version string (default: <source version>-<precision>)")
    parser.add_argument("--register", action="store_true", help="register the result as a new model version")
    parser.add_argument("--name", help="registered model name (default: the source package's name)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out directory")
    parser.set_defaults(func=_run)


def _fail(message: str) -> int:
    print(f"vivace quantize: error: {message}", file=sys.stderr)
    return 1


def _run(args) -> int:
    if not args.out and not args.register:
        return _fail("give --out DIR, --register, or both")
    rows = None
    if args.calibration:
        try:
            rows = np.load(args.calibration, allow_pickle=False)
        except (OSError, ValueError) as exc:
            return _fail(f"cannot read calibration file {args.calibration}: {exc}")
    source_ref = args.source
    lineage = {}
    try:
        if Path(args.source).is_dir():
            package = load_package(Path(args.source))
        else:
            from vivace.registry.models import get_version, resolve

            version = get_version(args.home, args.source)
            package = load_package(resolve(args.home, args.source))
            source_ref = version.ref
            lineage["registry_source"] = version.ref
        precision = "int8" if args.int8 else "fp32"
        with tempfile.TemporaryDirectory(prefix="vivace-quantize-") as tmp:
            out = Path(args.out) if args.out else Path(tmp) / "package"
            written, accuracy = quantize_package(
                package, out, rows, precision=precision, activation_scales=args.activation_scales,
                tolerance=args.tolerance, version=args.version, overwrite=args.force, lineage=lineage,
            )
            print(
                f"{source_ref} -> {written.name}/{written.version} ({precision}, {args.activation_scales} scales): "
                f"max abs error {accuracy.max_abs_error:.3g} (mean {accuracy.mean_abs_error:.3g}) "
                f"on {accuracy.rows} {accuracy.data} rows, tolerance {accuracy.tolerance:g}"
            )
            if args.out:
                print(f"wrote {out}")
            if args.register:
                from vivace.registry.models import register_model

                registered = register_model(
                    args.home, out, args.name or package.name,
                    description=f"native {precision} conversion of {source_ref}",
                    tags={"quantized_from": source_ref, "precision": precision, "platform": "native_mlp"},
                    metrics={"quantize_max_abs_error": accuracy.max_abs_error,
                             "quantize_mean_abs_error": accuracy.mean_abs_error},
                )
                print(f"registered {registered.ref}")
    except ConversionError as exc:
        return _fail(f"cannot convert {source_ref}: {exc}")
    except (PackageError, ValueError, OSError) as exc:
        return _fail(str(exc))
    return 0
