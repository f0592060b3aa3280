"""`vivace pipeline`: the bundled churn pipeline run for real (SQLite registry, training on
the bundled data, a `vivace serve` subprocess for the integration test), its cache, its
failure semantics, SIGKILL in the middle of a step, invalid files, and the CI files it
writes (validated against the vendored GitHub and GitLab JSON schemas)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from vivace.cli import main
from vivace.registry.models import get_version, list_versions
from vivace.registry.pipeline import (
    DEMO_PIPELINE, PipelineError, Runner, list_pipeline_runs, load_pipeline, run_steps,
)
from vivace.registry.store import Home

SCHEMAS = Path(__file__).parent / "schemas"
DEMO_STEPS = ["extract", "validate", "validate-holdout", "train", "evaluate", "smoke", "register", "promote"]


def vivace(*argv: str) -> tuple[int, str, str]:
    """The `vivace` command in this process (what the console script runs)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def results(stdout: str) -> dict[str, str]:
    """step -> ran/cached/FAILED/not run, from the report table a run prints last."""
    table = stdout[stdout.rindex("\nSTEP "):].split("\n\n")[0].splitlines()[2:]
    return {line.split()[0]: " ".join(line.split()[2:4]) if line.split()[2] == "not" else line.split()[2]
            for line in table}


def status(home: Path, *argv: str) -> dict[str, dict]:
    code, out, err = vivace("--home", str(home), "pipeline", "status", "--demo", "--json", *argv)
    assert code == 0, err
    return {d["step"]: d for d in json.loads(out)}


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """One home for the demo pipeline's runs, in the order of the tests below."""
    return tmp_path_factory.mktemp("pipeline") / "home"


def test_demo_runs_then_caches_and_a_parameter_reruns_only_what_follows_it(home):
    before = status(home)
    assert before["extract"]["reasons"] == ["never run"]
    assert before["train"]["reasons"] == ["upstream validate will run"]

    code, out, err = vivace("--home", str(home), "pipeline", "run", "--demo")
    assert code == 0, out + err
    assert results(out) == dict.fromkeys(DEMO_STEPS, "ran")
    assert get_version(home, "churn@production").version == 1

    code, out, _ = vivace("--home", str(home), "pipeline", "run", "--demo")
    assert code == 0 and results(out) == dict.fromkeys(DEMO_STEPS, "cached")

    plan = status(home, "-p", "train.epochs=10")
    assert [s for s, d in plan.items() if d["run"]] == ["train", "evaluate", "smoke", "register", "promote"]
    assert plan["train"]["reasons"] == ["parameter train.epochs changed (12 -> 10)"]
    assert plan["evaluate"]["reasons"] == ["upstream train will run"]
    assert plan["promote"]["reasons"] == ["upstream register will run"]

    code, out, err = vivace("--home", str(home), "pipeline", "run", "--demo", "-p", "train.epochs=10")
    assert code == 0, out + err
    assert results(out) == {**dict.fromkeys(["extract", "validate", "validate-holdout"], "cached"),
                            **dict.fromkeys(["train", "evaluate", "smoke", "register", "promote"], "ran")}
    assert get_version(home, "churn@production").version == 2

    # Lineage: the registry knows which run of which pipeline made version 2, and that run's
    # steps with their inputs, parameters, code version and outputs.
    version = get_version(home, "churn/2")
    run_id = version.tags["pipeline_run"]
    assert version.tags["pipeline"] == "churn"
    steps = {s["step"]: s for s in run_steps(home, run_id)}
    assert steps["validate"]["status"] == "cached" and steps["train"]["status"] == "done"
    train = steps["train"]
    assert train["params"] == {"train.epochs": 10, "train.learning_rate": 0.005}
    assert train["inputs"]["dataset"].startswith("churn@v1:") and train["inputs"]["config"]
    assert train["code"]["sha256"] and train["code"]["vivace"]
    assert train["outputs"]["run"] == version.run_id
    assert steps["register"]["outputs"] == {"model": "churn", "version": 2, "ref": "churn/2"}
    assert steps["evaluate"]["details"]["holder"].startswith("churn/1:")  # compared with production, v1
    code, out, _ = vivace("--home", str(home), "pipeline", "show", run_id)
    assert code == 0 and "param    train.epochs = 10" in out


def test_a_failing_integration_test_blocks_promotion_and_a_rerun_resumes(home):
    holder = get_version(home, "churn@production").version
    versions = len(list_versions(home, "churn"))
    params = ["-p", "train.epochs=5"]
    code, out, err = vivace("--home", str(home), "pipeline", "run", "--demo", *params, "-p", "latency_p99_ms=0.0001")
    assert code == 1, out + err
    assert results(out) == {**dict.fromkeys(["extract", "validate", "validate-holdout"], "cached"),
                            "train": "ran", "evaluate": "ran", "smoke": "FAILED",
                            "register": "not run", "promote": "not run"}
    assert "step 'smoke' (integration_test) failed" in out
    assert "[FAIL] request 'high-risk customer' latency p99:" in out and "(budget 0.0001 ms)" in out
    # the alias did not move, nothing was registered; what ran before the failure is recorded
    assert get_version(home, "churn@production").version == holder
    assert len(list_versions(home, "churn")) == versions
    failed_run = list_pipeline_runs(home, "churn")[-1]
    assert failed_run["status"] == "failed"
    steps = {s["step"]: s for s in run_steps(home, failed_run["id"])}
    assert steps["train"]["status"] == "done" and steps["smoke"]["status"] == "failed"
    assert "latency p99" in steps["smoke"]["error"]
    assert any(c["check"].endswith("latency p99") and not c["passed"] for c in steps["smoke"]["details"]["checks"])

    # The budget restored, the run resumes: train and evaluate come from the cache.
    plan = status(home, *params)
    assert [s for s, d in plan.items() if d["run"]] == ["smoke", "register", "promote"]
    code, out, err = vivace("--home", str(home), "pipeline", "run", "--demo", *params)
    assert code == 0, out + err
    assert [s for s, r in results(out).items() if r == "ran"] == ["smoke", "register", "promote"]
    assert get_version(home, "churn@production").version == versions + 1


def test_a_promotion_that_needs_an_approval_waits_for_another_identity(home):
    from vivace.registry.approvals import approve_promotion, list_requests

    holder = get_version(home, "churn@production").version
    params = ["-p", "train.epochs=6", "-p", "gate.approval=true"]
    code, out, err = vivace("--home", str(home), "pipeline", "run", "--demo", *params)
    assert code == 3, out + err
    assert results(out)["promote"] == "waiting" and results(out)["register"] == "ran"
    [request] = list_requests(home)
    assert f"promotion request {request.id} (churn/{holder + 1} -> @production) waits for approval" in out
    assert get_version(home, "churn@production").version == holder
    assert status(home, *params)["promote"]["reasons"][0].startswith("waiting in run ")

    approve_promotion(home, request.id, approver="a-reviewer")
    code, out, err = vivace("--home", str(home), "pipeline", "run", "--demo", *params)
    assert code == 0 and [s for s, r in results(out).items() if r == "ran"] == ["promote"], out + err
    assert "churn@production already at version" in out
    assert get_version(home, "churn@production").version == holder + 1


def test_status_reports_a_changed_output_and_force_reruns_a_step(home):
    # Forced, validate runs again; its outputs are the same, so what follows stays cached.
    code, out, err = vivace("--home", str(home), "pipeline", "run", "--demo", "-p", "train.epochs=6",
                            "-p", "gate.approval=true", "--force", "validate")
    assert code == 0, out + err
    assert [s for s, r in results(out).items() if r == "ran"] == ["validate"]
    data = home / "pipelines" / "churn" / "work" / "data" / "holdout.parquet"
    os.chmod(data, 0o644)
    data.write_bytes(data.read_bytes() + b"tampered")
    plan = status(home, "-p", "train.epochs=6", "-p", "gate.approval=true")
    assert plan["extract"]["reasons"] == [f"output {data} changed since it was written"]
    assert plan["validate-holdout"]["reasons"] == ["upstream extract will run"]
    assert plan["register"]["reasons"] == ["upstream evaluate, smoke, train will run"]

    pipeline = load_pipeline(DEMO_PIPELINE, home, ["train.epochs=6"])
    with Home(home) as h:
        decisions = {d.step: d for d in Runner(pipeline, h).plan(force={"promote"})}
    assert decisions["promote"].reasons == ["upstream register will run"]
    with pytest.raises(PipelineError, match="--force nope: no such step"):
        with Home(home) as h:
            Runner(pipeline, h).plan(force={"nope"})


KILLED = r"""
name: killed
params: {rows: 3}
steps:
  - name: data
    type: data.validate
    dataset: tiny
    source: tiny.csv
  - name: slow
    type: shell
    # The first attempt waits to be killed; the command is the same on the re-run.
    run: >-
      if [ ! -e attempted ]; then touch attempted; sleep 60; fi;
      printf 'ref\n%s\n' ${steps.data.outputs.ref} > result.csv
    outputs: {result: result.csv}
  - name: after
    type: data.validate
    dataset: tiny-result
    source: ${steps.slow.outputs.result}
"""


def test_sigkill_in_the_middle_of_a_step_leaves_a_consistent_home_and_the_rerun_completes(tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    (work / "tiny.csv").write_text("a,b\n1,x\n2,y\n3,z\n")
    (work / "pipeline.yaml").write_text(KILLED)
    proc = subprocess.Popen([sys.executable, "-m", "vivace", "--home", str(home), "pipeline", "run",
                             str(work / "pipeline.yaml")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not (work / "attempted").exists():
            assert proc.poll() is None, proc.stdout.read().decode()
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # the runner and the step's shell
        proc.wait()
    assert not (work / "result.csv").exists()

    with sqlite3.connect(home / "vivace.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT step, status FROM pipeline_steps").fetchall() == [("data", "done")]
        assert db.execute("SELECT name, version FROM datasets").fetchall() == [("tiny", 1)]
    assert list_pipeline_runs(home, "killed")[0]["status"] == "interrupted"  # its process is gone

    code, out, err = vivace("--home", str(home), "pipeline", "run", str(work / "pipeline.yaml"))
    assert code == 0, out + err
    assert results(out) == {"data": "cached", "slow": "ran", "after": "ran"}
    assert (work / "result.csv").read_text() == "ref\ntiny@v1\n"
    runs = list_pipeline_runs(home, "killed")
    assert [r["status"] for r in runs] == ["interrupted", "succeeded"]
    with sqlite3.connect(home / "vivace.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT name, version FROM datasets ORDER BY name").fetchall() == [("tiny", 1),
                                                                                             ("tiny-result", 1)]


BAD = {
    "cycle": ("""
name: p
steps:
  - {name: a, type: shell, run: "true", needs: [b]}
  - {name: b, type: shell, run: "true", needs: [a]}
""", "the steps form a cycle: a -> b -> a"),
    "indirect cycle": ("""
name: p
steps:
  - {name: a, type: shell, run: "echo ${steps.c.outputs.x}", outputs: {x: a.txt}}
  - {name: b, type: shell, run: "echo ${steps.a.outputs.x}", outputs: {x: b.txt}}
  - {name: c, type: shell, run: "echo ${steps.b.outputs.x}", outputs: {x: c.txt}}
""", "the steps form a cycle: a -> c -> b -> a"),
    "unknown type": ("""
name: p
steps: [{name: a, type: trian, config: c.yaml}]
""", "Unknown step type 'trian' - at `$.steps[0].type`"),
    "undeclared step": ("""
name: p
steps: [{name: t, type: train, config: c.yaml, dataset: "${steps.nope.outputs.ref}"}]
""", "$.steps[0].dataset: ${steps.nope.outputs.ref} names an undeclared step 'nope'"),
    "undeclared output": ("""
name: p
steps:
  - {name: v, type: data.validate, dataset: d, source: d.csv}
  - {name: t, type: train, config: c.yaml, dataset: "${steps.v.outputs.path}"}
""", "step 'v' (data.validate) has no output 'path'"),
    "unknown need": ("""
name: p
steps: [{name: a, type: shell, run: "true", needs: [zz]}]
""", "$.steps[0].needs[0]: unknown step 'zz'"),
    "undeclared parameter": ("""
name: p
params: {train: {epochs: 3}}
steps: [{name: t, type: train, config: c.yaml, set: {train.epochs: "${params.train.epoch}"}}]
""", "$.steps[0].set.train.epochs: ${params.train.epoch} names an undeclared parameter"),
    "wrong field type": ("""
name: p
params: {n: many}
steps: [{name: t, type: integration_test, model: m, requests: [{name: r, body: {}, repeat: "${params.n}"}]}]
""", "Expected `int`, got `str` - at `$.steps[0].requests[0].repeat`"),
    "unknown field": ("""
name: p
steps: [{name: a, type: shell, run: "true", colour: blue}]
""", "Object contains unknown field `colour` - at `$.steps[0]`"),
    "duplicate name": ("""
name: p
steps: [{name: a, type: shell, run: "true"}, {name: a, type: shell, run: "false"}]
""", "$.steps[1].name: step name 'a' is used twice"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_an_invalid_pipeline_is_refused_naming_the_problem(case, tmp_path):
    text, message = BAD[case]
    with pytest.raises(PipelineError) as exc:
        load_pipeline(None, tmp_path / "home", text=text)
    assert message in str(exc.value)


@pytest.mark.parametrize("override, message", [
    ("train.epochs=three", "parameter train.epochs: expected int (like its default 12), got 'three'"),
    ("train.epoch=3", "parameter override 'train.epoch': the pipeline declares no such parameter"),
    ("gate.margin=-0.02x", "parameter gate.margin: expected float"),
    ("train.epochs", "expected KEY=VALUE"),
])
def test_parameter_overrides_keep_their_declared_types(override, message, tmp_path):
    with pytest.raises(PipelineError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_pipeline(DEMO_PIPELINE, tmp_path, [override])
    assert load_pipeline(DEMO_PIPELINE, tmp_path, ["gate.margin=0", "train.epochs=3"]).params["gate.margin"] == 0.0


def test_an_invalid_file_fails_in_one_line_before_anything_runs(tmp_path):
    (tmp_path / "p.yaml").write_text(BAD["cycle"][0])
    code, out, err = vivace("--home", str(tmp_path / "home"), "pipeline", "run", str(tmp_path / "p.yaml"))
    assert code == 1 and out == ""
    assert err == "vivace pipeline run: error: $.steps: the steps form a cycle: a -> b -> a\n"
    assert not (tmp_path / "home").exists()


def schema(path: str):
    import jsonschema

    document = json.loads((SCHEMAS / path).read_text())
    validator = jsonschema.validators.validator_for(document)
    validator.check_schema(document)
    return validator(document)


@pytest.mark.parametrize("system", ["github", "gitlab"])
def test_the_ci_configuration_validates_against_the_ci_systems_schema(system, tmp_path, monkeypatch):
    validator = schema("schemastore/github-workflow.json" if system == "github" else "gitlab/gitlab-ci.json")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "pipeline.yaml").write_text(KILLED)
    for source, params in ((["--demo"], []), (["pipeline.yaml"], ["-p", "rows=5"])):
        code, out, err = vivace("pipeline", "ci", f"--{system}", *source, *params)
        assert code == 0, err
        config = yaml.safe_load(out)
        errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(config)]
        assert not errors, errors
        steps = ["data", "slow", "after"] if params else DEMO_STEPS
        command = [f"vivace pipeline run {source[0]} --until {s}" + (" -p rows=5" if params else "") for s in steps]
        if system == "gitlab":
            assert config["stages"] == steps
            assert [config[s]["script"] for s in steps] == [[c] for c in command]
            assert [config[s].get("needs") for s in steps] == [None] + [[s] for s in steps[:-1]]
            paths = config["slow"]["artifacts"]["paths"] if params else config["extract"]["artifacts"]["paths"]
        else:
            jobs = config["jobs"]
            assert list(jobs) == steps and "workflow_dispatch" in config["on"]
            assert [jobs[s].get("needs") for s in steps] == [None] + [[s] for s in steps[:-1]]
            assert [jobs[s]["steps"][-2]["run"] for s in steps] == command
            paths = jobs[steps[1]]["steps"][-1]["with"]["path"].splitlines()
        assert ".vivace/" in paths
        if params:
            assert "result.csv" in paths  # what the shell step writes travels to the next job
    # the gate: the demo's promote job waits for a person
    code, out, _ = vivace("pipeline", "ci", f"--{system}", "--demo")
    config = yaml.safe_load(out)
    if system == "gitlab":
        assert config["promote"]["when"] == "manual" and config["promote"]["allow_failure"] is False
        assert config["promote"]["environment"]["name"] == "production"
        assert "when" not in config["register"]
    else:
        assert config["jobs"]["promote"]["environment"] == {"name": "production"}
        assert "environment" not in config["jobs"]["register"]


def test_the_vendored_schemas_carry_their_licences():
    assert "Apache License" in (SCHEMAS / "schemastore" / "LICENSE").read_text()
    assert "MIT Expat" in (SCHEMAS / "gitlab" / "LICENSE").read_text()
    readme = (SCHEMAS / "README.md").read_text()
    assert "github-workflow.json" in readme and "gitlab-ci.json" in readme


FEATURES = """
name: features
params: {features: [stats:f0, stats:f1]}
steps:
  - name: training-set
    type: features.historical
    entities: entities.parquet
    features: ${params.features}
    out: data/training.parquet
  - name: version-it
    type: data.validate
    dataset: driver-training
    source: ${steps.training-set.outputs.path}
"""


def test_a_point_in_time_training_set_is_rebuilt_when_the_feature_source_changes(tmp_path):
    import pandas as pd
    from test_features_online import END, make_store, write_source

    make_store(tmp_path)
    home = tmp_path / "home"
    pd.DataFrame({"driver_id": [1, 2, 3], "event_timestamp": [END] * 3}).to_parquet(tmp_path / "entities.parquet")
    (tmp_path / "p.yaml").write_text(FEATURES)
    code, out, err = vivace("--home", str(home), "pipeline", "run", str(tmp_path / "p.yaml"))
    assert code == 0, out + err
    training = pd.read_parquet(tmp_path / "data" / "training.parquet")
    assert training["f1"].tolist() == pytest.approx([1.1, 2.1, 3.1])
    assert get_dataset_versions(home, "driver-training") == [1]

    write_source(tmp_path / "stats.parquet", 50, offset=100.0)  # new feature values at the source
    code, out, _ = vivace("--home", str(home), "pipeline", "status", str(tmp_path / "p.yaml"))
    assert "input feature_store changed" in out
    code, out, err = vivace("--home", str(home), "pipeline", "run", str(tmp_path / "p.yaml"))
    assert code == 0 and results(out) == {"training-set": "ran", "version-it": "ran"}, out + err
    assert pd.read_parquet(tmp_path / "data" / "training.parquet")["f0"].tolist() == pytest.approx([101, 102, 103])
    assert get_dataset_versions(home, "driver-training") == [1, 2]


def get_dataset_versions(home: Path, name: str) -> list[int]:
    from vivace.registry.data import list_datasets

    return [v.version for v in list_datasets(home, name)]


PACKAGED = """
name: packaged
steps:
  - name: package
    type: package
    model: model.pt
    out: models/mine
    model_name: mine
    args: [--input, "x:FP32:4"]
  - name: smoke
    type: integration_test
    model: ${steps.package.outputs.package}
    requests:
      - name: sums
        repeat: 5
        body: {inputs: [{name: x, shape: [1, 4], datatype: FP32, data: [1, 2, 3, 4]}]}
        expect: {outputs: {output__0: {close_to: [10.0], shape: [1, 1]}}}
        latency: {max_ms: 1000}
  - name: register
    type: register
    package: ${steps.package.outputs.package}
    model: mine
    needs: [smoke]
"""


def test_a_packaged_model_is_tested_behind_a_live_endpoint_and_registered(tmp_path):
    import torch

    model = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    torch.jit.save(torch.jit.trace(model, torch.ones(2, 4)), str(tmp_path / "model.pt"))
    (tmp_path / "p.yaml").write_text(PACKAGED)
    home = tmp_path / "home"
    code, out, err = vivace("--home", str(home), "pipeline", "run", str(tmp_path / "p.yaml"))
    assert code == 0, out + err
    assert results(out) == {"package": "ran", "smoke": "ran", "register": "ran"}
    assert get_version(home, "mine@latest").tags["pipeline"] == "packaged"
    # a wrong expectation: the report names the check and the value seen
    (tmp_path / "p.yaml").write_text(PACKAGED.replace("close_to: [10.0]", "close_to: [11.0]"))
    code, out, _ = vivace("--home", str(home), "pipeline", "run", str(tmp_path / "p.yaml"))
    assert code == 1 and results(out) == {"package": "cached", "smoke": "FAILED", "register": "not run"}
    assert "[FAIL] request 'sums' output output__0: values [10] not within 1e-06 of [11.0]" in out, out


def test_the_readme_pipeline_commands_work_in_a_fresh_home(tmp_path, monkeypatch):
    from test_readme import blocks, commands, section

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VIVACE_HOME", str(tmp_path / ".vivace"))
    outputs = []
    for argv in commands(blocks(section("Pipelines as code"), "sh")[0]):
        assert argv[0] == "vivace", argv
        code, out, err = vivace(*argv[1:])
        assert code == 0, (argv, out, err)
        outputs.append(out)
    assert results(outputs[1]) == dict.fromkeys(DEMO_STEPS, "cached")
    assert "parameter train.epochs changed (12 -> 8)" in outputs[2]
    assert [s for s, r in results(outputs[3]).items() if r == "ran"] == ["train", "evaluate", "smoke", "register",
                                                                         "promote"]
    for path, schema_file in ((".github/workflows/churn.yml", "schemastore/github-workflow.json"),
                              (".gitlab-ci.yml", "gitlab/gitlab-ci.json")):
        assert not list(schema(schema_file).iter_errors(yaml.safe_load((tmp_path / path).read_text())))
