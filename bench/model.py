"""`vivace bench model --out DIR`: write the benchmark reference model package
(registry/reference_model.py)."""
from __future__ import annotations

from vivace.registry.reference_model import write_reference_model


def register(subparsers) -> None:
    parser = subparsers.add_parser("model", help="write the benchmark reference model package")
    parser.add_argument("--out", required=True, help="package directory to create")
    parser.add_argument("--max-batch-size", type=int, default=128)
    parser.add_argument("--platform", choices=["torchscript", "torch_export"], default="torchscript")
    parser.add_argument("--force", action="store_true", help="replace an existing package")
    parser.set_defaults(func=_run)


def _run(args) -> int:
    package = write_reference_model(args.out, args.max_batch_size, args.platform, overwrite=args.force)
    print(f"wrote model package {package.name}/{package.version} ({package.platform}) to {args.out}")
    return 0
