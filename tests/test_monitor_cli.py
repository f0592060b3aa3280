"""`vivace monitor report|profile` on real parquet, csv and npy files."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from vivace.monitor import cli


def run(argv: list[str], home: str = ".vivace") -> int:
    parser = argparse.ArgumentParser(prog="vivace")
    parser.add_argument("--home", default=home)
    cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture(scope="module")
def frames():
    rng = np.random.default_rng(17)
    n = 4000
    ref = {"age": rng.normal(40, 10, n), "income": rng.lognormal(10, 1, n),
           "city": rng.choice(np.array(["rome", "oslo", "lima"]), n)}
    cur = {"age": rng.normal(48, 10, n), "income": rng.lognormal(10, 1, n),
           "city": rng.choice(np.array(["rome", "oslo", "lima"]), n)}
    return ref, cur


def test_report_on_parquet_writes_html_and_json(tmp_path, frames, capsys):
    ref, cur = frames
    pq.write_table(pa.table(ref), tmp_path / "ref.parquet")
    pq.write_table(pa.table(cur), tmp_path / "cur.parquet")
    out, js = tmp_path / "out" / "report.html", tmp_path / "report.json"
    assert run(["monitor", "report", "--reference", str(tmp_path / "ref.parquet"),
                "--current", str(tmp_path / "cur.parquet"), "--out", str(out), "--json", str(js)]) == 0
    page = out.read_text()
    assert "<svg" in page and "https://" not in page and "http://" not in page
    data = json.loads(js.read_text())
    assert data["drifted_features"] == ["age"]
    assert [f["kind"] for f in data["features"]] == ["numeric", "numeric", "categorical"]
    assert "1 of 3 features drifted: age" in capsys.readouterr().err


def test_report_on_csv_and_npy_json_to_stdout(tmp_path, frames, capsys):
    ref, cur = frames
    pcsv.write_csv(pa.table(ref), tmp_path / "ref.csv")
    pcsv.write_csv(pa.table(cur), tmp_path / "cur.csv")
    assert run(["monitor", "report", "--reference", str(tmp_path / "ref.csv"),
                "--current", str(tmp_path / "cur.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["drifted_features"] == ["age"]

    np.save(tmp_path / "ref.npy", np.column_stack([ref["age"], ref["income"]]))
    np.save(tmp_path / "cur.npy", np.column_stack([cur["age"], cur["income"]]))
    assert run(["monitor", "report", "--reference", str(tmp_path / "ref.npy"), "--current",
                str(tmp_path / "cur.npy"), "--json", "--fail-on-drift", "--threshold", "dataset_share=0.5"]) == 3
    data = json.loads(capsys.readouterr().out)
    assert data["drifted_features"] == ["f0"] and data["dataset_drift"]


def test_profile_then_report_against_profile(tmp_path, frames, capsys):
    ref, cur = frames
    pq.write_table(pa.table(ref), tmp_path / "ref.parquet")
    pq.write_table(pa.table(cur), tmp_path / "cur.parquet")
    assert run(["monitor", "profile", str(tmp_path / "ref.parquet"), "--out", str(tmp_path / "profile.json")]) == 0
    assert run(["monitor", "report", "--profile", str(tmp_path / "profile.json"),
                "--current", str(tmp_path / "cur.parquet"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reference"] == "profile" and data["drifted_features"] == ["age"]


@pytest.mark.parametrize("setup, message", [
    (lambda p: None, "no such file"),
    (lambda p: (p / "ref.parquet").write_bytes(b"PAR1 truncated"), "cannot read parquet"),
    (lambda p: (p / "ref.parquet").write_text(""), "cannot read parquet"),
])
def test_unreadable_reference_is_a_one_line_error(tmp_path, frames, capsys, setup, message):
    setup(tmp_path)
    pq.write_table(pa.table(frames[1]), tmp_path / "cur.parquet")
    out = tmp_path / "report.html"
    assert run(["monitor", "report", "--reference", str(tmp_path / "ref.parquet"),
                "--current", str(tmp_path / "cur.parquet"), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()  # nothing half-written


def test_csv_with_junk_in_a_numeric_column(tmp_path, capsys):
    (tmp_path / "ref.csv").write_text("a,b\n1,2\n3,4\n5,6\n")
    (tmp_path / "cur.csv").write_text("a,b\n1,2\noops,4\n5,6\n")
    assert run(["monitor", "report", "--reference", str(tmp_path / "ref.csv"),
                "--current", str(tmp_path / "cur.csv"), "--json"]) == 1
    assert "column 'a' is numeric in the reference but the current data holds non-numeric value 'oops'" in capsys.readouterr().err


def test_mismatched_columns_and_bad_options(tmp_path, capsys):
    np.save(tmp_path / "ref.npy", np.ones((10, 3)))
    np.save(tmp_path / "cur.npy", np.ones((10, 2)))
    base = ["monitor", "report", "--reference", str(tmp_path / "ref.npy"), "--current", str(tmp_path / "cur.npy")]
    assert run(base + ["--json"]) == 1
    assert "current data lacks reference column(s): f2" in capsys.readouterr().err
    assert run(base) == 1
    assert "nothing to write" in capsys.readouterr().err
    assert run(base + ["--json", "--threshold", "psi"]) == 1
    assert "STAT=VALUE" in capsys.readouterr().err
    (tmp_path / "data.txt").write_text("x")
    assert run(["monitor", "report", "--reference", str(tmp_path / "data.txt"), "--current",
                str(tmp_path / "cur.npy"), "--json"]) == 1
    assert "unsupported file type .txt" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("vivace") is None, reason="console script not installed")
def test_through_the_vivace_console_script(tmp_path, frames):
    ref, cur = frames
    pq.write_table(pa.table(ref), tmp_path / "ref.parquet")
    pq.write_table(pa.table(cur), tmp_path / "cur.parquet")
    proc = subprocess.run(["vivace", "--home", str(tmp_path / "home"), "monitor", "report", "--reference",
                           str(tmp_path / "ref.parquet"), "--current", str(tmp_path / "cur.parquet"), "--json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["drifted_features"] == ["age"]


def test_report_against_a_registered_models_profile(tmp_path, frames, capsys):
    from vivace.monitor.drift import build_profile
    from vivace.registry.models import register_model, set_alias
    from vivace.registry.package import write_package

    ref, cur = frames
    manifest = {"name": "scorer", "version": "1", "platform": "torchscript", "model_file": "model.pt",
                "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, 2]}],
                "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}], "max_batch_size": 8}
    write_package(tmp_path / "pkg", manifest, {"model.pt": b"weights are not read here",
                                               "profile.json": json.dumps(build_profile(ref)).encode()})
    home = str(tmp_path / "home")
    version = register_model(home, tmp_path / "pkg", "scorer")
    set_alias(home, "scorer", version.version, "production")
    pq.write_table(pa.table(cur), tmp_path / "cur.parquet")
    argv = ["monitor", "report", "--model", "scorer@production", "--current", str(tmp_path / "cur.parquet"), "--json"]
    assert run(argv, home=home) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["reference"] == "profile" and data["drifted_features"] == ["age"]
    argv[3] = "scorer@staging"
    assert run(argv, home=home) == 1
    assert "has no alias 'staging'" in capsys.readouterr().err
