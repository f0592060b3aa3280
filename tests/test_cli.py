"""The `vivace` command: every subcommand is routed to the module that defines it, and a
command loads only its own module (fresh-process start-up time)."""
from __future__ import annotations

import subprocess
import sys
from datetime import timedelta

from vivace.cli import COMMANDS, _command_in, build_parser


def test_every_registered_command_is_routed():
    parser = build_parser()
    registered = set(parser._subparsers._group_actions[0].choices)  # noqa: SLF001 - argparse has no public API
    assert registered == set(COMMANDS)


def test_command_detection_skips_global_options():
    assert _command_in(["--home", "/x", "score", "pkg"]) == "score"
    assert _command_in(["--help"]) is None


def test_score_does_not_import_the_other_modules(mlp_package, tmp_path):
    import numpy as np

    np.save(tmp_path / "x.npy", np.zeros((1, 32), np.float32))
    code = (
        "import sys; from vivace.cli import main; "
        f"rc = main(['score', {str(mlp_package)!r}, '--input', {str(tmp_path / 'x.npy')!r}, "
        f"'--output', {str(tmp_path / 'y.npy')!r}]); "
        "print(rc, sorted(m for m in ('pandas', 'vivace.registry.store', 'vivace.features.store', "
        "'vivace.engine.http') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "0 []", out.stdout + out.stderr


def vivace(*args: str, home=None) -> subprocess.CompletedProcess:
    """The real console entry point, in a fresh process."""
    extra = ["--home", str(home)] if home is not None else []
    return subprocess.run([sys.executable, "-m", "vivace", *extra, *args], capture_output=True, text=True, timeout=120)


def test_python_dash_m_vivace_is_the_command():
    result = vivace("--help")
    assert result.returncode == 0 and "serve" in result.stdout and "features" in result.stdout


def test_features_get_takes_ids_after_the_features_and_a_now(tmp_path):
    from test_features_online import END, make_store

    make_store(tmp_path, ttl="2h")
    home = tmp_path / "home"
    assert vivace("features", "materialize", "--end", END.isoformat(), home=home).returncode == 0
    at_end = vivace("features", "get", "--features", "stats:f0", "4", "404", "--now", END.isoformat(), home=home)
    assert at_end.returncode == 0, at_end.stderr
    rows = [line.split("\t") for line in at_end.stdout.splitlines()[1:]]
    assert [r[:2] for r in rows] == [["4", "True"], ["404", "False"]]  # ids not swallowed by --features
    # A day later every row is older than the view's 2 h TTL.
    later = (END + timedelta(days=1)).isoformat()
    stale = vivace("features", "get", "4", "--features", "stats:f0", "--now", later, home=home)
    assert stale.stdout.splitlines()[1].split("\t")[:2] == ["4", "False"]
    missing = vivace("features", "get", "--features", "stats:f0", home=home)
    assert missing.returncode == 1 and "at least one entity id" in missing.stderr


def test_help_shows_runs_actions_and_serve_defaults():
    runs = vivace("runs", "--help").stdout
    assert all(action in runs for action in ("list", "show", "compare"))
    serve = vivace("serve", "--help").stdout
    assert "(default: 8000)" in serve and "(default: 10.0)" in serve


def test_score_takes_the_raw_columns_of_a_trained_model_and_carries_ids_through(tmp_path):
    import numpy as np
    import pandas as pd
    import yaml

    from vivace.registry.data import add_dataset
    from vivace.registry.demo_data import TRAIN_CONFIG, churn_frame
    from vivace.registry.package import load_package
    from vivace.registry.train import encode, train

    raw = churn_frame(rows=800)
    raw.to_parquet(tmp_path / "churn.parquet")
    home = tmp_path / "home"
    add_dataset(home, "churn", tmp_path / "churn.parquet")
    config = yaml.safe_load(TRAIN_CONFIG.read_text())
    config["train"]["epochs"] = 2
    package = train(home, config).package_dir
    specs = load_package(package).metadata["features"]
    assert any(s["kind"] == "categorical" for s in specs)  # string columns the user never encoded

    scored = vivace("score", package, "--input", tmp_path / "churn.parquet", "--output", tmp_path / "out.parquet")
    assert scored.returncode == 0, scored.stderr
    out = pd.read_parquet(tmp_path / "out.parquet")
    assert list(out["customer_id"]) == list(raw["customer_id"])  # ids carried through, in order
    np.save(tmp_path / "encoded.npy", encode(raw, specs))
    assert vivace("score", package, "--input", tmp_path / "encoded.npy", "--output", tmp_path / "enc.npy").returncode == 0
    np.testing.assert_allclose(out[out.columns[-1]].to_numpy(), np.load(tmp_path / "enc.npy").ravel(), rtol=1e-6)

    raw.drop(columns=[specs[0]["name"]]).to_parquet(tmp_path / "partial.parquet")
    partial = vivace("score", package, "--input", tmp_path / "partial.parquet", "--output", tmp_path / "p.parquet")
    assert partial.returncode == 1 and specs[0]["name"] in partial.stderr and not (tmp_path / "p.parquet").exists()
