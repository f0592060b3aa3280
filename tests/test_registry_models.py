"""Model registry: register, aliases, resolve, integrity, promotion gates, audit, cards, CLI."""
from __future__ import annotations

import argparse
import os
import sqlite3

import pytest
import torch

from vivace.registry import Home, IntegrityError, NotFoundError, RegistryError, resolve
from vivace.registry.cli import register as register_cli
from vivace.registry.models import (
    PromotionRefused, delete_alias, get_version, list_models, model_card, promote, register_model, set_alias,
    update_version,
)
from vivace.registry.package import load_package, write_package
from vivace.registry.runs import finish_run, start_run


def run_cli(home, *argv: str) -> int:
    parser = argparse.ArgumentParser(prog="vivace")
    parser.add_argument("--home")
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["--home", str(home), *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def model_bytes(tmp_path_factory) -> bytes:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("m") / "model.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(4, 1)), str(path))
    return path.read_bytes()


def make_package(path, model_bytes: bytes, note: str = "a"):
    manifest = {"name": "lin", "version": "1", "platform": "torchscript", "model_file": "model.pt",
                "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, 4]}],
                "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}]}
    write_package(path, manifest, {"model.pt": model_bytes, "notes.txt": note.encode()})
    return path


@pytest.fixture
def home(tmp_path):
    with Home(tmp_path / "home") as h:
        yield h


def test_register_alias_resolve(home, tmp_path, model_bytes):
    v1 = register_model(home, make_package(tmp_path / "p1", model_bytes, "one"), "churn", description="first",
                        tags={"team": "retention"}, metrics={"auc": 0.8})
    v2 = register_model(home, make_package(tmp_path / "p2", model_bytes, "two"), "churn")
    assert (v1.version, v2.version) == (1, 2) and v1.tags == {"team": "retention"}
    assert set_alias(home, "churn", 1, "production") is None
    path = resolve(home, "churn@production")
    assert path.parent == home.packages and load_package(path).files["notes.txt"]
    assert (path / "notes.txt").read_text() == "one"
    assert resolve(home.path, "churn/2") == resolve(home, "churn@latest") == resolve(home, "churn")
    assert set_alias(home, "churn", 2, "production") == 1  # moving returns the old version
    assert (resolve(home, "churn@production") / "notes.txt").read_text() == "two"
    assert get_version(home, "churn/2").aliases == ["production"]
    assert list_models(home) == [{"name": "churn", "description": "", "versions": 2, "latest": 2,
                                  "aliases": {"production": 2}}]
    assert delete_alias(home, "churn", "production") == 2
    with pytest.raises(NotFoundError, match="no alias 'production'"):
        resolve(home, "churn@production")
    # Stored artifacts are immutable: read-only files.
    assert not os.access(path / "model.pt", os.W_OK) or os.geteuid() == 0
    assert oct((path / "model.pt").stat().st_mode & 0o777) == "0o444"


def test_same_package_twice_is_stored_once_as_two_versions(home, tmp_path, model_bytes):
    pkg = make_package(tmp_path / "p", model_bytes)
    a = register_model(home, pkg, "m")
    b = register_model(home, pkg, "m")
    assert (a.version, b.version) == (1, 2) and a.package_sha == b.package_sha
    assert len(list(home.packages.iterdir())) == 1


def test_versions_immutable_but_tags_and_description_editable(home, tmp_path, model_bytes):
    register_model(home, make_package(tmp_path / "p", model_bytes), "m", tags={"a": "1", "b": "2"})
    mv = update_version(home, "m/1", description="churn model", tags={"c": "3"}, remove_tags=["a"])
    assert mv.description == "churn model" and mv.tags == {"b": "2", "c": "3"}
    with pytest.raises(sqlite3.DatabaseError, match="immutable"):
        home.db.execute("UPDATE model_versions SET package_sha = 'x' WHERE name = 'm'")
    with pytest.raises(sqlite3.DatabaseError, match="immutable"):
        home.db.execute("UPDATE model_versions SET metrics = '{}' WHERE name = 'm'")


def test_unknown_names_versions_aliases(home, tmp_path, model_bytes):
    register_model(home, make_package(tmp_path / "p", model_bytes), "m")
    with pytest.raises(NotFoundError, match="unknown model 'nope'"):
        resolve(home, "nope@production")
    with pytest.raises(NotFoundError, match="no version 7"):
        resolve(home, "m/7")
    with pytest.raises(NotFoundError, match="no alias 'staging'"):
        resolve(home, "m@staging")
    with pytest.raises(RegistryError, match="must be a number"):
        resolve(home, "m/x")
    with pytest.raises(NotFoundError):
        set_alias(home, "m", 5, "production")
    with pytest.raises(RegistryError, match="reserved"):
        set_alias(home, "m", 1, "latest")
    with pytest.raises(NotFoundError):
        delete_alias(home, "m", "ghost")
    with pytest.raises(RegistryError, match="not a model package"):
        register_model(home, tmp_path / "nothing", "m")
    with pytest.raises(RegistryError, match="invalid model name"):
        register_model(home, tmp_path / "p", "bad name")


def test_corrupted_artifact_refused(home, tmp_path, model_bytes):
    register_model(home, make_package(tmp_path / "p", model_bytes), "m")
    path = resolve(home, "m/1")
    model = path / "model.pt"
    os.chmod(model, 0o644)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="model.pt is corrupted"):
        resolve(home, "m/1")
    # A rewritten manifest (hashes updated to match the tampered file) is caught too.
    manifest = path / "package.json"
    os.chmod(manifest, 0o644)
    manifest.write_text(manifest.read_text().replace('"lin"', '"evil"'))
    with pytest.raises(IntegrityError, match="package.json is corrupted"):
        resolve(home, "m/1")
    assert resolve(home, "m/1", verify=False) == path


def test_promotion_gate(home, tmp_path, model_bytes):
    def version(note, auc, tests=()):
        run_id = None
        if tests:  # behavioural results come from a training run
            run_id = start_run(home, "r", {}, {})
            finish_run(home, run_id, "finished", metrics={"auc": auc}, behavioural=list(tests))
        mv = register_model(home, make_package(tmp_path / note, model_bytes, note), "m", run_id=run_id,
                            metrics={"auc": auc})
        return mv.version

    v1, v2, v3 = version("a", 0.80), version("b", 0.78), version("c", 0.85, [{"name": "t", "passed": False}])
    checks, previous = promote(home, "m", v1)
    assert previous is None and all(ok for _, ok, _ in checks)
    with pytest.raises(PromotionRefused, match="metric auc: 0.78 vs holder m/1 0.8") as info:
        promote(home, "m", v2)
    assert [ok for _, ok, _ in info.value.checks] == [False, True]
    assert get_version(home, "m@production").version == v1
    promote(home, "m", v2, margin=-0.05)  # a tolerated regression
    assert get_version(home, "m@production").version == v2
    with pytest.raises(PromotionRefused, match="behavioural tests: failed: t"):
        promote(home, "m", v3)
    with pytest.raises(PromotionRefused, match="needs >= 0.88"):
        promote(home, "m", version("d", 0.86), margin=0.1)
    with pytest.raises(RegistryError, match="no 'logloss' metric"):
        promote(home, "m", v1, metric="logloss")
    with pytest.raises(RegistryError, match="needs --reason"):
        promote(home, "m", v3, force=True)
    promote(home, "m", v3, force=True, reason="hotfix approved by on-call")
    assert get_version(home, "m@production").version == v3
    actions = [(r["action"], r["target"], r["reason"]) for r in home.audit_log("m")]
    assert ("model.promote.refused", "m/2", "") in actions
    assert ("model.promote.override", "m/3", "hotfix approved by on-call") in actions
    override = [r for r in home.audit_log("m") if r["action"] == "model.promote.override"][0]
    assert override["details"]["previous"] == v2 and override["user"]


def test_promotion_min_direction(home, tmp_path, model_bytes):
    for note, loss in (("a", 0.5), ("b", 0.4), ("c", 0.45)):
        register_model(home, make_package(tmp_path / note, model_bytes, note), "m", metrics={"logloss": loss})
    promote(home, "m", 1, metric="logloss")
    promote(home, "m", 2, metric="logloss")  # lower is better for a loss, by default
    with pytest.raises(PromotionRefused):
        promote(home, "m", 3, metric="logloss")
    promote(home, "m", 3, metric="logloss", direction="max")


def test_audit_log_is_append_only(home, tmp_path, model_bytes):
    register_model(home, make_package(tmp_path / "p", model_bytes), "m")
    set_alias(home, "m", 1, "staging", reason="smoke test")
    delete_alias(home, "m", "staging")
    records = home.audit_log()
    assert [r["action"] for r in records] == ["model.register", "model.alias", "model.alias.delete"]
    assert records[1]["reason"] == "smoke test" and records[1]["details"] == {"alias": "staging", "previous": None}
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        home.db.execute("DELETE FROM audit")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        home.db.execute("UPDATE audit SET reason = 'x'")


def test_model_card_without_run(home, tmp_path, model_bytes):
    register_model(home, make_package(tmp_path / "p", model_bytes), "m", description="Scores | ranks",
                   metrics={"auc": 0.9})
    card = model_card(home, "m/1")
    for section in ("# Model card: m version 1", "## Intended use", "Scores | ranks", "## Data",
                    "No training data recorded", "| auc | 0.9 |", "## Behavioural tests", "## Lineage",
                    "`input__0` FP32 [-1, 4]"):
        assert section in card


def test_cli_models_commands(tmp_path, model_bytes, capsys):
    home = tmp_path / "h"
    make_package(tmp_path / "p1", model_bytes, "1")
    make_package(tmp_path / "p2", model_bytes, "2")
    assert run_cli(home, "models", "register", str(tmp_path / "p1"), "--name", "m", "--tag", "k=v") == 0
    assert run_cli(home, "models", "register", str(tmp_path / "p2"), "--name", "m") == 0
    assert "registered m/2" in capsys.readouterr().out
    assert run_cli(home, "models", "alias", "m", "1", "champion") == 0
    assert run_cli(home, "models", "alias", "m", "2", "champion") == 0
    assert "m@champion -> version 2 (was version 1)" in capsys.readouterr().out
    assert run_cli(home, "models", "list") == 0
    assert "@champion->2" in capsys.readouterr().out
    assert run_cli(home, "models", "show", "m") == 0 and run_cli(home, "models", "show", "m@champion") == 0
    assert "m/2  (@champion)" in capsys.readouterr().out
    assert run_cli(home, "models", "resolve", "m@champion") == 0
    assert capsys.readouterr().out.strip() == str(resolve(home, "m/2"))
    assert run_cli(home, "models", "tag", "m/1", "owner=ana") == 0
    assert run_cli(home, "models", "describe", "m/1", "baseline") == 0
    capsys.readouterr()
    assert run_cli(home, "models", "promote", "m", "1", "--alias", "production") == 1
    assert "has no 'auc' metric" in capsys.readouterr().err
    assert run_cli(home, "models", "promote", "m", "1", "--force", "--reason", "first deploy") == 0
    assert run_cli(home, "models", "card", "m/1", "-o", str(tmp_path / "card.md")) == 0
    assert "baseline" in (tmp_path / "card.md").read_text()
    assert run_cli(home, "models", "alias", "m", "--delete", "champion") == 0
    assert run_cli(home, "models", "alias", "m", "--delete", "champion") == 1
    assert run_cli(home, "models", "show", "m/9") == 1
    assert run_cli(home, "models", "register", str(tmp_path / "nope"), "--name", "m") == 1
    assert "error:" in capsys.readouterr().err
    assert run_cli(home, "audit", "--target", "m") == 0
    out = capsys.readouterr().out
    for action in ("model.register", "model.alias", "model.update", "model.promote.refused",
                   "model.promote.override", "first deploy", "model.alias.delete"):
        assert action in out
