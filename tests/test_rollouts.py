"""Progressive delivery: rollouts on a registry alias (registry/rollouts.py), applied live by
`vivace serve NAME@ALIAS` (engine/rollout.py): canary weights, sticky keys, shadow copies,
promotion through the gate and abort. Real registry, real console script, real servers."""
from __future__ import annotations

import http.client
import io
import json
import sqlite3
import subprocess
import sys

import pytest

from conftest import ServerProcess, wait_for

from vivace.registry import Home, RegistryError
from vivace.registry.models import get_version, register_model, set_alias
from vivace.registry.rollouts import (
    abort_rollout, get_rollout, list_rollouts, promote_rollout, start_rollout, step_rollout,
)

# Version v of the model answers 0.25 * v for every row: versions are told apart by their
# answers, and 0.25 (v1) and 0.75 (v3) sit on either side of the 0.5 label threshold.
VERSIONS = (1, 2, 3)


def cli(home, *args, check=True):
    result = subprocess.run([sys.executable, "-m", "vivace", "--home", str(home), *map(str, args)],
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    import torch

    from vivace.registry.package import write_package

    root = tmp_path_factory.mktemp("versions")
    out = {}
    for v in VERSIONS:
        class Constant(torch.nn.Module):
            def __init__(self, value: float):
                super().__init__()
                self.value = value

            def forward(self, x):
                return x[:, :1] * 0.0 + self.value

        buffer = io.BytesIO()
        torch.jit.save(torch.jit.trace(Constant(0.25 * v), torch.zeros(2, 4)), buffer)
        out[v] = root / f"v{v}"
        write_package(out[v], {
            "name": "scorer", "platform": "torchscript", "model_file": "model.pt",
            "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, 4]}],
            "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}],
            "max_batch_size": 16, "parameters": {"torch_num_threads": 1},
        }, {"model.pt": buffer.getvalue()})
    return out


@pytest.fixture
def home(tmp_path, packages):
    with Home(tmp_path / "home") as h:
        for v in VERSIONS:
            register_model(h, packages[v], "scorer", metrics={"auc": 0.8 + 0.01 * v})
        set_alias(h, "scorer", 1, "production")
        yield h


# -- the registry -----------------------------------------------------------------------------

def test_start_step_promote_and_abort_are_audited(home):
    rollout = start_rollout(home, "scorer@production", canary=2, weight=10, reason="try v2")
    assert (rollout.stable, rollout.canary, rollout.weight, rollout.shadow) == (1, 2, 10.0, None)
    assert step_rollout(home, "scorer@production", 50, reason="healthy").weight == 50
    checks, previous = promote_rollout(home, "scorer@production", reason="done")
    assert previous == 1 and all(ok for _, ok, _ in checks)
    assert get_version(home, "scorer@production").version == 2 and get_rollout(home, "scorer@production") is None

    start_rollout(home, "scorer@production", shadow=3, shadow_sample=0.5)
    assert abort_rollout(home, "scorer@production").shadow == 3
    assert get_version(home, "scorer@production").version == 2 and list_rollouts(home) == []
    actions = [r["action"] for r in home.audit_log("scorer@production")]
    assert actions == ["rollout.start", "rollout.step", "rollout.promote", "rollout.start", "rollout.abort"]
    step = next(r for r in home.audit_log("scorer@production") if r["action"] == "rollout.step")
    assert step["reason"] == "healthy" and step["details"]["previous"] == 10.0


@pytest.mark.parametrize("kwargs, words", [
    ({"ref": "scorer", "canary": 2}, "NAME@ALIAS"),
    ({"ref": "scorer@staging", "canary": 2}, "no alias 'staging'"),
    ({"ref": "scorer@production"}, "needs a canary version"),
    ({"ref": "scorer@production", "canary": 1}, "the canary must be another version"),
    ({"ref": "scorer@production", "canary": 9}, "9"),
    ({"ref": "scorer@production", "canary": 2, "weight": 120}, "0 to 100"),
    ({"ref": "scorer@production", "canary": 2, "sticky": "header"}, "sticky must be"),
    ({"ref": "scorer@production", "shadow": 3, "shadow_sample": 0}, "shadow sample"),
])
def test_bad_rollouts_are_refused_and_write_nothing(home, kwargs, words):
    with pytest.raises(RegistryError, match=words):
        start_rollout(home, **kwargs)
    assert list_rollouts(home) == [] and not [r for r in home.audit_log() if r["action"].startswith("rollout")]


def test_one_rollout_per_alias_and_a_refused_gate_keeps_it(home):
    start_rollout(home, "scorer@production", canary=2)
    with pytest.raises(RegistryError, match="already has a rollout"):
        start_rollout(home, "scorer@production", canary=3)
    set_alias(home, "scorer", 3, "production")  # the holder now beats the canary on auc
    start = get_rollout(home, "scorer@production")
    assert start is not None and start.stable == 3
    from vivace.registry.models import PromotionRefused

    with pytest.raises(PromotionRefused):
        promote_rollout(home, "scorer@production")
    assert get_rollout(home, "scorer@production") is not None  # still on
    assert get_version(home, "scorer@production").version == 3


def test_a_home_made_before_rollouts_gets_the_table(tmp_path, packages):
    with Home(tmp_path / "old") as h:
        register_model(h, packages[1], "scorer")
        register_model(h, packages[2], "scorer")
        set_alias(h, "scorer", 1, "production")
    with sqlite3.connect(tmp_path / "old" / "vivace.db") as db:  # as written before this table existed
        db.execute("DROP TABLE IF EXISTS rollouts")
    assert get_rollout(tmp_path / "old", "scorer@production") is None
    assert start_rollout(tmp_path / "old", "scorer@production", canary=2).canary == 2


def test_cli_round_trip(home):
    out = cli(home.path, "rollout", "start", "scorer@production", "--canary", "2", "--weight", "20",
              "--sticky", "parameter").stdout
    assert "canary version 2 at 20%" in out and "sticky by parameter" in out
    status = json.loads(cli(home.path, "rollout", "status", "scorer@production", "--json").stdout)
    assert status[0]["canary"] == 2 and status[0]["weight"] == 20
    assert "at 60%" in cli(home.path, "rollout", "promote", "scorer@production", "--weight", "60").stdout
    assert "promoted" in cli(home.path, "rollout", "promote", "scorer@production").stdout
    refused = cli(home.path, "rollout", "abort", "scorer@production", check=False)
    assert refused.returncode == 1 and "has no rollout" in refused.stderr
    assert "no rollouts" in cli(home.path, "rollout", "status").stdout


# -- the server ---------------------------------------------------------------------------------

def infer(port: int, routing_key: str | None = None, version: str | None = None) -> tuple[str, float]:
    body = {"inputs": [{"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": [0.0] * 4}]}
    if routing_key is not None:
        body["parameters"] = {"routing_key": routing_key}
    path = f"/v2/models/scorer{'/versions/' + version if version else ''}/infer"
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, json.dumps(body))
    response = conn.getresponse()
    answer = json.loads(response.read())
    conn.close()
    assert response.status == 200, answer
    return answer["model_version"], answer["outputs"][0]["data"][0]


def rollout_status(port: int) -> dict:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/v2/models/scorer/rollout")
    response = conn.getresponse()
    assert response.status == 200
    return json.loads(response.read())


@pytest.mark.parametrize("frontend", ["native", "python"])
def test_server_applies_weights_stickiness_shadow_promotion_and_abort(home, frontend):
    server = ServerProcess(["scorer@production"], "--follow-interval", "0.1", "--http-frontend", frontend,
                           env={"VIVACE_HOME": str(home.path)})
    try:
        port = server.port
        assert rollout_status(port)["ref"] is None
        assert {infer(port)[0] for _ in range(5)} == {"1"}

        # Weighted: 30% to the canary; each answer says which version gave it.
        start_rollout(home, "scorer@production", canary=2, weight=30)
        wait_for(lambda: rollout_status(port)["canary"] == "2", what="the canary to be applied")
        answers = [infer(port) for _ in range(400)]
        assert {v for v, _ in answers} == {"1", "2"}
        assert all(value == 0.25 * int(v) for v, value in answers)
        share = sum(v == "2" for v, _ in answers) / len(answers)
        assert 0.2 < share < 0.4, share  # p = 0.3, n = 400: 4+ standard deviations either side
        # The rollout's counts are the answers, whichever front end drew the versions (the
        # native one draws them itself for a plain weighted split).
        routed = rollout_status(port)["routed"]
        assert routed == {v: sum(a == v for a, _ in answers) for v in ("1", "2")}, routed
        assert infer(port, version="2")[0] == "2" and infer(port, version="1")[0] == "1"  # pinned versions

        # Sticky by the routing_key parameter: one key, one version.
        abort_rollout(home, "scorer@production")
        start_rollout(home, "scorer@production", canary=2, weight=50, sticky="parameter")
        wait_for(lambda: rollout_status(port)["sticky"] == "parameter", what="the sticky rollout")
        chosen = {key: {infer(port, routing_key=key)[0] for _ in range(8)} for key in map(str, range(12))}
        assert all(len(versions) == 1 for versions in chosen.values()), chosen
        assert {v for versions in chosen.values() for v in versions} == {"1", "2"}

        # Shadow: every request copied to version 3, answered by version 1, compared.
        abort_rollout(home, "scorer@production")
        start_rollout(home, "scorer@production", shadow=3, shadow_sample=1.0)
        wait_for(lambda: (rollout_status(port)["shadow"] or {}).get("version") == "3", what="the shadow")
        assert {infer(port) for _ in range(20)} == {("1", 0.25)}
        shadow = wait_for(lambda: (s := rollout_status(port)["shadow"])["requests"] >= 20 and s)
        assert shadow["failed"] == 0 and shadow["label_disagreements"] == 20
        assert shadow["max_abs_diff"] == pytest.approx(0.5) and shadow["mean_abs_diff"] == pytest.approx(0.5)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/metrics")
        metrics = conn.getresponse().read().decode()
        assert 'vivace_shadow_requests_total{model="scorer",version="3"}' in metrics
        assert 'vivace_shadow_max_abs_diff{model="scorer",version="3"} 0.5' in metrics
        assert 'vivace_rollout_routed_total{model="scorer",version="1"}' in metrics
        import re
        from importlib.resources import files

        dashboard = json.loads(files("vivace.monitor.data").joinpath("grafana-dashboard.json").read_text())
        panels = [m for p in dashboard["panels"] for t in p["targets"]
                  for m in re.findall(r"vivace_(?:rollout|shadow)_[a-z_]+", t["expr"])]
        assert len(set(panels)) >= 4 and all(m in metrics for m in panels), panels

        # Promotion moves the alias to the canary; the server follows and the split ends.
        abort_rollout(home, "scorer@production")
        start_rollout(home, "scorer@production", canary=2, weight=10)
        wait_for(lambda: rollout_status(port)["canary"] == "2", what="the second canary")
        promote_rollout(home, "scorer@production")
        wait_for(lambda: rollout_status(port)["ref"] is None and rollout_status(port)["stable"] == "2",
                 what="the promotion to be followed")
        assert {infer(port)[0] for _ in range(20)} == {"2"}
    finally:
        assert server.stop() == 0
    errors = server.proc.stderr.read().decode()
    assert "Traceback" not in errors and "ERROR" not in errors, errors[-3000:]  # e.g. a route table that failed


def test_every_worker_applies_the_rollout(home):
    """--workers 2: each worker follows the registry and splits alike (connections land on
    either worker); an abort sends every worker back to the stable version."""
    server = ServerProcess(["scorer@production"], "--follow-interval", "0.1", "--workers", "2",
                           env={"VIVACE_HOME": str(home.path)})
    try:
        start_rollout(home, "scorer@production", canary=2, weight=50)

        def applied_everywhere() -> bool:  # each call is a new connection, which either worker may take
            return all(rollout_status(server.port)["canary"] == "2" for _ in range(20))

        # A worker still starting up takes no connections yet, and applies the rollout before
        # it does (test_a_server_started_during_a_rollout_splits_from_its_first_request).
        wait_for(applied_everywhere, timeout=30, what="the workers to apply the rollout")
        answers = [infer(server.port)[0] for _ in range(300)]
        share = answers.count("2") / len(answers)
        assert 0.38 < share < 0.62, share  # p = 0.5, n = 300: 4 standard deviations either side
        abort_rollout(home, "scorer@production")
        wait_for(lambda: all(rollout_status(server.port)["ref"] is None for _ in range(20)), timeout=30,
                 what="every worker to end the split")
        assert {infer(server.port)[0] for _ in range(40)} == {"1"}
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("workers", [None, "2"])
def test_a_server_started_during_a_rollout_splits_from_its_first_request(home, workers):
    """A process that starts while a rollout is on (a restart, a worker of --workers that
    comes up after the others) answers no request before it applies it, however long until
    its next look at the registry."""
    start_rollout(home, "scorer@production", canary=2, weight=100)
    server = ServerProcess(["scorer@production"], "--follow-interval", "300",
                           *(("--workers", workers) if workers else ()), env={"VIVACE_HOME": str(home.path)})
    try:
        assert {infer(server.port)[0] for _ in range(20)} == {"2"}
        assert rollout_status(server.port)["canary"] == "2"
    finally:
        assert server.stop() == 0


def test_shadow_comparisons_are_in_the_prediction_log(home, tmp_path):
    predictions = tmp_path / "predictions.jsonl"
    server = ServerProcess(["scorer@production"], "--follow-interval", "0.1", "--prediction-log", str(predictions),
                           "--prediction-log-sample", "0", env={"VIVACE_HOME": str(home.path)})
    try:
        start_rollout(home, "scorer@production", shadow=3, shadow_sample=1.0)
        wait_for(lambda: (rollout_status(server.port)["shadow"] or {}).get("version") == "3", what="the shadow")
        assert {infer(server.port) for _ in range(20)} == {("1", 0.25)}
        wait_for(lambda: rollout_status(server.port)["shadow"]["requests"] >= 20, what="the comparisons")
    finally:
        assert server.stop() == 0
    # Every compared copy is a record: the shadow's answer, both latencies, the divergence.
    records = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert len(records) == 20 and all(r.get("shadow_of") for r in records)  # sampling 0: nothing else is logged
    for r in records:
        assert (r["model"], r["version"], r["shadow_of"], r["shadow_status"]) == ("scorer", "3", "1", 200)
        assert r["max_abs_diff"] == pytest.approx(0.5) and r["label_disagreement"] == 1
        assert r["latency_s"] > 0 and r["answered_latency_s"] > 0 and r["outputs"][0]["data"] == [0.75]


# -- automatic analysis -------------------------------------------------------------------------

def _counts(success: int, failures: int, slow: int = 0):
    from vivace.engine.rollout import Counts

    # buckets: <= 1 ms, <= 10 ms, <= 100 ms, overflow; `slow` successes land in the 100 ms one
    return Counts(success, failures, (0.001, 0.01, 0.1), (success - slow, 0, slow, 0))


def _split(weight=10.0, shadow=False, **policy):
    from vivace.engine.rollout import Split
    from vivace.registry.rollouts import check_policy

    class Runner:
        def __init__(self, version):
            self.version = version

    return Split("scorer@production", Runner("1"), Runner("2"), weight, "", Runner("3") if shadow else None,
                 1.0 if shadow else 0.0, check_policy({"steps": [10, 50, 100], "min_requests": 100,
                                                       "step_seconds": 5, **policy}))


def test_judge_waits_steps_promotes_and_aborts():
    from vivace.engine.rollout import judge

    good = _counts(1000, 2)
    assert judge(_split(), good, _counts(50, 0), [], 60)[0] == "wait"            # too few canary answers
    assert judge(_split(), good, _counts(500, 1), [], 1)[0] == "wait"            # too soon
    decision, evidence = judge(_split(), good, _counts(500, 1), [], 6)
    assert decision == "step" and evidence["next_weight"] == 50
    assert judge(_split(weight=50), good, _counts(500, 1), [], 6)[0] == "promote"
    decision, evidence = judge(_split(), good, _counts(500, 40), [], 6)              # 8% errors vs 0.2%
    assert decision == "abort" and "error rate" in evidence["failed"][0]
    decision, evidence = judge(_split(), good, _counts(500, 0, slow=100), [], 6)     # p99 1 ms -> 100 ms
    assert decision == "abort" and "p99" in evidence["failed"][0]
    decision, evidence = judge(_split(), good, _counts(20, 0), ["f3"], 0)            # drift: no minimum
    assert decision == "abort" and evidence["canary_drifting"] == ["f3"]
    assert judge(_split(fail_on_drift=False), good, _counts(20, 0), ["f3"], 0)[0] == "wait"
    shadowed = _split(shadow=True)
    shadowed.shadowed, shadowed.disagreements = 200, 30
    decision, evidence = judge(shadowed, good, _counts(20, 0), [], 0)
    assert decision == "abort" and evidence["shadow_disagreement"] == 0.15


def test_bad_policies_are_refused(home):
    for policy, words in (({"steps": [50, 10, 100]}, "increasing"), ({"steps": [10, 50]}, "ending at 100"),
                          ({"steps": [10, 100], "max_p99_ratio": -1}, "non-negative"),
                          ({"steps": [10, 100], "speed": 1}, "unknown rollout policy")):
        with pytest.raises(RegistryError, match=words):
            start_rollout(home, "scorer@production", canary=2, policy=policy)
    with pytest.raises(RegistryError, match="need a canary"):
        start_rollout(home, "scorer@production", shadow=3, policy={"steps": [10, 100]})
    assert start_rollout(home, "scorer@production", canary=2, policy={"steps": [25, 100]}).weight == 25


@pytest.fixture
def failing_canary(home, tmp_path):
    """Version 4: answers like version 2, but fails every request whose first value is 7."""
    import torch

    from vivace.registry.package import write_package

    class Fragile(torch.nn.Module):
        def forward(self, x):
            if bool((x[:, 0] == 7.0).any()):
                raise RuntimeError("the canary broke")
            return x[:, :1] * 0.0 + 0.5

    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(Fragile()), buffer)
    write_package(tmp_path / "v4", {
        "name": "scorer", "platform": "torchscript", "model_file": "model.pt",
        "inputs": [{"name": "input__0", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "output__0", "datatype": "FP32", "shape": [-1, 1]}],
        "max_batch_size": 16, "parameters": {"torch_num_threads": 1},
    }, {"model.pt": buffer.getvalue()})
    return register_model(home, tmp_path / "v4", "scorer", metrics={"auc": 0.99}).version


def _post(port: int, value: float) -> int:
    body = {"inputs": [{"name": "input__0", "shape": [1, 4], "datatype": "FP32", "data": [value] * 4}]}
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", "/v2/models/scorer/infer", json.dumps(body))
    status = conn.getresponse().status
    conn.close()
    return status


# The servers below judge errors and approvals, not latency: with a few dozen requests a
# single slow first answer would make the p99 check decide, so its ratio is set out of reach.
def test_server_steps_and_promotes_a_healthy_canary_by_itself(home):
    server = ServerProcess(["scorer@production"], "--follow-interval", "0.1", "--idle-timeout", "1",
                           env={"VIVACE_HOME": str(home.path)})
    try:
        start_rollout(home, "scorer@production", canary=2, policy={
            "steps": [50, 100], "min_requests": 20, "step_seconds": 0.2, "max_p99_ratio": 1000})

        def promoted():
            for _ in range(10):
                assert _post(server.port, 0.0) == 200
            return get_version(home, "scorer@production").version == 2

        wait_for(promoted, timeout=60, what="the automatic promotion")
        actions = [(r["action"], r["details"].get("weight")) for r in home.audit_log("scorer@production")]
        # 50% is the first step; the next is 100%, which is the promotion itself.
        assert actions == [("rollout.start", 50.0), ("rollout.promote", 50.0)]
        promote = next(r for r in home.audit_log("scorer@production") if r["action"] == "rollout.promote")
        assert promote["reason"] == "automatic analysis: promote"
        assert promote["details"]["evidence"]["canary"]["requests"] >= 20
    finally:
        assert server.stop() == 0


def test_server_aborts_a_failing_canary_by_itself(home, failing_canary):
    server = ServerProcess(["scorer@production"], "--follow-interval", "0.1", env={"VIVACE_HOME": str(home.path)})
    try:
        start_rollout(home, "scorer@production", canary=failing_canary, policy={
            "steps": [50, 100], "min_requests": 10, "step_seconds": 0.2, "max_p99_ratio": 1000})

        def aborted():
            for _ in range(10):
                _post(server.port, 7.0)  # version 1 answers 200; the canary 500
            return get_rollout(home, "scorer@production") is None

        wait_for(aborted, timeout=60, what="the automatic abort")
        assert get_version(home, "scorer@production").version == 1
        abort = next(r for r in home.audit_log("scorer@production") if r["action"] == "rollout.abort")
        assert abort["reason"].startswith("automatic analysis: error rate")
        evidence = abort["details"]["evidence"]
        assert evidence["canary"]["error_rate"] == 1.0 and evidence["stable"]["error_rate"] == 0.0
        wait_for(lambda: rollout_status(server.port)["ref"] is None, what="the server to end the split")
        assert {_post(server.port, 7.0) for _ in range(10)} == {200}  # back on version 1 alone
    finally:
        assert server.stop() == 0


# -- approvals ---------------------------------------------------------------------------------

def as_user(home, user, *args, check=True):
    import os

    result = subprocess.run([sys.executable, "-m", "vivace", "--home", str(home.path), *map(str, args)],
                            capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, USER=user, LOGNAME=user))
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_a_protected_alias_moves_only_with_a_second_identitys_approval(home):
    as_user(home, "ana", "models", "protect", "scorer", "production")
    for refused in (("models", "promote", "scorer", "2", "--alias", "production"),
                    ("models", "alias", "scorer", "2", "production"),
                    ("models", "alias", "scorer", "--delete", "production"),
                    ("rollout", "promote", "scorer@production")):
        if refused[0] == "rollout":
            start_rollout(home, "scorer@production", canary=2)
        result = as_user(home, "ana", *refused, check=False)
        assert result.returncode == 1 and "is protected" in result.stderr, (refused, result.stderr)
    assert get_version(home, "scorer@production").version == 1

    out = as_user(home, "ana", "models", "request", "scorer", "2", "--alias", "production", "--reason", "v2 wins").stdout
    request_id = int(out.split()[2].rstrip(":"))
    own = as_user(home, "ana", "models", "approve", str(request_id), check=False)
    assert own.returncode == 1 and "another identity must approve" in own.stderr
    assert "stays off" not in as_user(home, "ana", "models", "requests").stdout
    assert "approved" in as_user(home, "bo", "models", "approve", str(request_id)).stdout
    assert get_version(home, "scorer@production").version == 2
    assert get_rollout(home, "scorer@production") is None  # the approved canary ended its rollout
    again = as_user(home, "cy", "models", "approve", str(request_id), check=False)
    assert again.returncode == 1 and "already approved" in again.stderr

    # An emergency override needs a reason and is audited as one.
    bare = as_user(home, "ana", "models", "alias", "scorer", "1", "production", "--force", check=False)
    assert bare.returncode == 1 and "needs --reason" in bare.stderr
    as_user(home, "ana", "models", "alias", "scorer", "1", "production", "--force", "--reason", "incident 7")
    log = home.audit_log("scorer")
    actions = [r["action"] for r in log]
    assert "model.promote.requested" in actions and "model.alias.override" in actions
    approved = next(r for r in log if r["action"] == "model.promote.approved")
    assert approved["details"]["requester"] == "ana" and approved["details"]["approver"] == "bo"
    assert next(r for r in log if r["action"] == "model.alias.override")["user"] == "ana"


def test_automatic_rollout_on_a_protected_alias_asks_for_approval(home):
    from vivace.registry.approvals import approve_promotion, list_requests, protect_alias

    protect_alias(home, "scorer", "production")
    server = ServerProcess(["scorer@production"], "--follow-interval", "0.1", env={"VIVACE_HOME": str(home.path)})
    try:
        start_rollout(home, "scorer@production", canary=2, policy={
            "steps": [50, 100], "min_requests": 10, "step_seconds": 0.1, "max_p99_ratio": 1000})

        def requested():
            for _ in range(10):
                assert _post(server.port, 0.0) == 200
            return list_requests(home)

        request = wait_for(requested, timeout=60, what="the automatic promotion request")[0]
        assert (request.version, request.requester) == (2, "vivace serve (automatic analysis)")
        assert get_version(home, "scorer@production").version == 1  # nothing moved yet
        # The server records its verdict once the registry's write of the request has returned.
        wait_for(lambda: rollout_status(server.port)["automatic"]["verdict"]["decision"] == "awaiting approval",
                 what="the verdict to say so")
        approve_promotion(home, request.id, approver="reviewer")
        wait_for(lambda: rollout_status(server.port)["ref"] is None and rollout_status(server.port)["stable"] == "2",
                 what="the approved promotion to be followed")
    finally:
        assert server.stop() == 0


def test_rollouts_and_approvals_over_http_with_tokens(home, tmp_path):
    from vivace.engine.auth import TokenStore
    from vivace.registry.approvals import protect_alias

    tokens = tmp_path / "tokens.json"
    store = TokenStore(tokens)
    ana = store.create("ana", ["admin", "approve", "read"])
    bo = store.create("bo", ["approve"])
    reader = store.create("reader", ["read"])
    protect_alias(home, "scorer", "production")
    server = ServerProcess(["scorer@production"], "--auth", "--auth-tokens", str(tokens), "--repository-control",
                           "--follow-interval", "0.1", env={"VIVACE_HOME": str(home.path)})

    def post(path, token, parameters):
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        conn.request("POST", path, json.dumps({"parameters": parameters}), {"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())

    try:
        rollout = "/v2/repository/models/scorer/rollout"
        assert post(rollout, reader, {"action": "start", "alias": "production", "canary": 2})[0] == 403
        status, body = post(rollout, ana, {"action": "start", "alias": "production", "canary": 2, "weight": 20})
        assert status == 200 and body["rollout"]["canary"] == 2 and body["rollout"]["weight"] == 20
        assert get_rollout(home, "scorer@production").weight == 20
        assert post(rollout, ana, {"action": "step", "alias": "production", "weight": 40})[1]["rollout"]["weight"] == 40
        status, body = post(rollout, ana, {"action": "promote", "alias": "production"})
        assert status == 403 and "protected" in body["error"]  # the alias needs an approval
        assert post(rollout, ana, {"action": "step", "alias": "production", "weight": 140})[0] == 400
        assert post(rollout, ana, {"action": "jump", "alias": "production"})[0] == 400

        status, body = post("/v2/repository/models/scorer/request", ana, {"version": 2, "alias": "production"})
        assert status == 200 and body["requester"] == "ana"
        request = body["request"]
        status, body = post("/v2/repository/models/scorer/approve", ana, {"request": request})
        assert status == 400 and "another identity must approve" in body["error"]
        assert post("/v2/repository/models/scorer/approve", bo, {"request": 999})[0] == 404
        status, body = post("/v2/repository/models/scorer/approve", bo, {"request": request})
        assert status == 200 and body == {"request": request, "decision": "approve", "decider": "bo", "previous": 1}
        assert get_version(home, "scorer@production").version == 2 and get_rollout(home, "scorer@production") is None
        approved = next(r for r in home.audit_log("scorer") if r["action"] == "model.promote.approved")
        assert (approved["details"]["requester"], approved["details"]["approver"]) == ("ana", "bo")
    finally:
        assert server.stop() == 0
