"""Data versioning: content addressing, validation, lineage, open_dataset, CLI."""
from __future__ import annotations

import argparse
import os

import numpy as np
import pandas as pd
import pytest

from vivace.registry import Home, IntegrityError, NotFoundError, RegistryError, open_dataset
from vivace.registry.cli import register as register_cli
from vivace.registry.data import SchemaViolation, add_dataset, get_dataset, list_datasets, load_schema
from vivace.registry.demo_data import SCHEMA, churn_frame


def run_cli(home, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="vivace")
    parser.add_argument("--home")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["--home", str(home), *argv])
    return args.func(args)


@pytest.fixture
def home(tmp_path):
    with Home(tmp_path / "home") as h:
        yield h


@pytest.fixture(scope="module")
def churn() -> pd.DataFrame:
    return churn_frame(rows=400)


def test_same_content_same_version_no_copy(home, tmp_path, churn):
    first = tmp_path / "a.parquet"
    churn.to_parquet(first)
    v1, created = add_dataset(home, "churn", first, SCHEMA)
    assert created and v1.ref == "churn@v1" and v1.row_count == 400 and v1.parent is None
    moved = tmp_path / "elsewhere" / "b.parquet"
    moved.parent.mkdir()
    moved.write_bytes(first.read_bytes())
    again, created = add_dataset(home, "churn", moved)
    assert not created and again.version == 1 and again.content_hash == v1.content_hash
    assert len(list(home.objects.rglob("*"))) == 2  # one prefix folder, one object
    assert not list(home.tmp.iterdir())


def test_new_content_new_version_with_parent_and_stats(home, tmp_path, churn):
    churn.to_csv(tmp_path / "v1.csv", index=False)
    churn.iloc[:300].to_csv(tmp_path / "v2.csv", index=False)
    add_dataset(home, "churn", tmp_path / "v1.csv")
    v2, _ = add_dataset(home, "churn", tmp_path / "v2.csv", SCHEMA)
    assert (v2.version, v2.parent, v2.row_count) == (2, 1, 300)
    assert v2.source == str((tmp_path / "v2.csv").absolute())
    assert v2.schema["columns"]["plan"]["allowed"] == ["basic", "standard", "premium"]
    stats = v2.stats["tenure_months"]
    assert stats["min"] >= 0 and stats["max"] <= 72 and stats["nulls"] == 0
    assert v2.stats["plan"]["distinct"] == 3
    assert open_dataset("churn@v1", home).shape == (400, 8)
    assert open_dataset("churn@latest", home).shape == (300, 8)
    assert open_dataset("churn@2", home).shape == (300, 8)
    assert open_dataset("churn", home).shape == (300, 8)
    assert get_dataset(home, f"churn@{v2.content_hash[:10]}").version == 2
    assert [v.version for v in list_datasets(home, "churn")] == [1, 2]


def test_open_dataset_uses_vivace_home_env(tmp_path, churn, monkeypatch):
    churn.to_parquet(tmp_path / "c.parquet")
    add_dataset(tmp_path / "envhome", "c", tmp_path / "c.parquet")
    monkeypatch.setenv("VIVACE_HOME", str(tmp_path / "envhome"))
    pd.testing.assert_frame_equal(open_dataset("c@v1"), churn)


def test_npy_and_folder_snapshots(home, tmp_path):
    array = np.arange(12, dtype="float32").reshape(4, 3)
    np.save(tmp_path / "x.npy", array)
    v, _ = add_dataset(home, "arr", tmp_path / "x.npy")
    assert list(open_dataset("arr@v1", home).columns) == ["c0", "c1", "c2"] and v.row_count == 4
    folder = tmp_path / "parts"
    folder.mkdir()
    pd.DataFrame({"a": [1, 2]}).to_csv(folder / "part-0.csv", index=False)
    pd.DataFrame({"a": [3]}).to_csv(folder / "part-1.csv", index=False)
    (folder / "README.txt").write_text("kept in the snapshot, not read")
    v, _ = add_dataset(home, "parts", folder)
    assert v.row_count == 3 and set(v.files) == {"part-0.csv", "part-1.csv", "README.txt"}
    assert open_dataset("parts", home)["a"].tolist() == [1, 2, 3]
    # A folder with the same files elsewhere is the same content.
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in folder.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    assert add_dataset(home, "parts", copy) == (v, False)


def test_invalid_data_refused_with_every_failure_and_no_version(home, tmp_path, churn):
    bad = churn.copy()
    bad.loc[0, "tenure_months"] = -3
    bad.loc[1, "plan"] = "gold"
    bad.loc[2, "customer_id"] = bad.loc[3, "customer_id"]
    bad.loc[4, "monthly_charges"] = None
    bad["support_calls"] = bad["support_calls"].astype(str)
    bad = bad.drop(columns=["region"])
    bad.to_parquet(tmp_path / "bad.parquet")
    schema = tmp_path / "s.yaml"
    schema.write_text(
        "columns:\n"
        "  customer_id: {dtype: int, unique: true}\n"
        "  tenure_months: {dtype: int, min: 0}\n"
        "  plan: {allowed: [basic, standard, premium]}\n"
        "  monthly_charges: {nullable: false, max: 90}\n"
        "  support_calls: {dtype: int}\n"
        "  region: {dtype: string}\n"
        "rows: {min: 1000}\n"
    )
    with pytest.raises(SchemaViolation) as info:
        add_dataset(home, "churn", tmp_path / "bad.parquet", schema)
    found = {(col, rule) for col, rule, _ in info.value.violations}
    assert found == {
        ("<rows>", "rows.min"), ("customer_id", "unique"), ("tenure_months", "min"), ("plan", "allowed"),
        ("monthly_charges", "nullable"), ("monthly_charges", "max"), ("support_calls", "dtype"),
        ("region", "missing"),
    }
    assert "no version created" in str(info.value) and "'plan': allowed" in str(info.value)
    details = {(col, rule): detail for col, rule, detail in info.value.violations}
    # The rows and values to look at are named, not only the rule.
    assert "in rows [4]" in details[("monthly_charges", "nullable")]
    assert repr(str(bad.loc[3, "customer_id"])) in details[("customer_id", "unique")]
    assert "gold" in details[("plan", "allowed")]
    with pytest.raises(NotFoundError):
        get_dataset(home, "churn")
    assert not list(home.objects.rglob("*")) and not list(home.tmp.iterdir())


def test_strict_schema_refuses_undeclared_columns(home, tmp_path):
    pd.DataFrame({"a": [1], "b": [2]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(SchemaViolation, match="'b': undeclared"):
        add_dataset(home, "d", tmp_path / "d.csv", {"columns": {"a": {"dtype": "int64"}}, "allow_extra_columns": False})


@pytest.mark.parametrize("text, message", [
    ("columns: {a: {maxx: 3}}", "unknown rule"),
    ("columns: {a: {dtype: floaty}}", "unknown dtype"),
    ("columns: {a: {min: low}}", "min must be a number"),
    ("rows: {least: 3}", "rows must be"),
    ("colums: {}", "unknown keys"),
    ("columns: [a, b", "invalid YAML"),
    ("- 1", "must be a mapping"),
])
def test_malformed_schema_files(tmp_path, text, message):
    path = tmp_path / "schema.yaml"
    path.write_text(text)
    with pytest.raises(RegistryError, match=message):
        load_schema(path)


def test_input_errors(home, tmp_path):
    with pytest.raises(RegistryError, match="no such file"):
        add_dataset(home, "x", tmp_path / "missing.csv")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(RegistryError, match="unsupported format"):
        add_dataset(home, "x", tmp_path / "x.txt")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(RegistryError, match="cannot read as parquet"):
        add_dataset(home, "x", tmp_path / "broken.parquet")
    with pytest.raises(RegistryError, match="invalid dataset name"):
        add_dataset(home, "../etc", tmp_path / "x.txt")
    with pytest.raises(RegistryError, match="schema file .* does not exist"):
        add_dataset(home, "x", tmp_path / "x.txt", tmp_path / "nope.yaml")
    assert not list(home.tmp.iterdir())


def test_unknown_names_and_versions(home, tmp_path):
    pd.DataFrame({"a": [1]}).to_csv(tmp_path / "d.csv", index=False)
    add_dataset(home, "d", tmp_path / "d.csv")
    with pytest.raises(NotFoundError, match="unknown dataset 'nope'"):
        open_dataset("nope@v1", home)
    with pytest.raises(NotFoundError, match="no version 'v9'"):
        open_dataset("d@v9", home)
    with pytest.raises(RegistryError, match="invalid dataset version"):
        open_dataset("d@yesterday", home)


def test_corrupted_dataset_bytes_refused(home, tmp_path):
    pd.DataFrame({"a": [1, 2, 3]}).to_csv(tmp_path / "d.csv", index=False)
    v, _ = add_dataset(home, "d", tmp_path / "d.csv")
    obj = home.object_path(v.content_hash)
    os.chmod(obj, 0o644)
    obj.write_bytes(obj.read_bytes().replace(b"3", b"4"))
    with pytest.raises(IntegrityError, match="corrupted"):
        open_dataset("d@v1", home)
    obj.unlink()
    with pytest.raises(IntegrityError, match="missing"):
        open_dataset("d@v1", home)


def test_cli_data_commands(tmp_path, churn, capsys):
    churn.to_parquet(tmp_path / "c.parquet")
    home = tmp_path / "h"
    assert run_cli(home, "data", "add", "churn", str(tmp_path / "c.parquet"), "--schema", str(SCHEMA)) == 0
    assert "churn@v1  created" in capsys.readouterr().out
    assert run_cli(home, "data", "add", "churn", str(tmp_path / "c.parquet")) == 0
    assert "unchanged" in capsys.readouterr().out
    assert run_cli(home, "data", "list") == 0
    assert "churn    v1       400" in capsys.readouterr().out
    assert run_cli(home, "data", "show", "churn@v1") == 0
    out = capsys.readouterr().out
    assert "tenure_months" in out and "schema: declared" in out
    assert run_cli(home, "data", "show", "churn@v5") == 1
    assert "error: dataset 'churn' has no version 'v5'" in capsys.readouterr().err
    churn.assign(plan="gold").to_csv(tmp_path / "bad.csv", index=False)
    assert run_cli(home, "data", "add", "churn", str(tmp_path / "bad.csv"), "--schema", str(SCHEMA)) == 1
    assert "column 'plan': allowed" in capsys.readouterr().err
    assert run_cli(home, "audit") == 0
    assert "data.add" in capsys.readouterr().out
