"""Bearer-token authentication with scopes, the audit log, the model repository API and TLS,
against a real `vivace serve` on 127.0.0.1."""
from __future__ import annotations

import http.client
import json
import os
import socket
import sqlite3
import ssl
import stat
import subprocess
import sys
import time

import pytest

from conftest import ServerProcess, free_port

BODY = json.dumps({"inputs": [{"name": "input__0", "shape": [1, 32], "datatype": "FP32", "data": [0.1] * 32}]})


def cli(home, *args, check=True):
    result = subprocess.run([sys.executable, "-m", "vivace.cli", "--home", str(home), *map(str, args)],
                            capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def request(server, method, path, body=None, token=None, headers=None, context=None):
    if context is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10, context=context)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    headers = dict(headers or {})
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request(method, path, body=body, headers=headers)
    response = conn.getresponse()
    data = response.read()
    conn.close()
    return response.status, dict(response.getheaders()), data


def audit_events(home) -> list[dict]:
    path = home / "audit" / "server.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module", params=["native", "python"])
def frontend(request) -> str:
    """Each front end: the native one answers granted fast-path infers in C++ and hands the
    rest (refusals included) to the same Python dispatch as the Python front end."""
    return request.param


@pytest.fixture(scope="module")
def home(tmp_path_factory, mlp_package, frontend):  # one per front end: tests revoke and move aliases
    home = tmp_path_factory.mktemp("home")
    cli(home, "models", "register", mlp_package, "--name", "churn")
    cli(home, "models", "register", mlp_package, "--name", "churn")
    cli(home, "models", "alias", "churn", "1", "production")
    return home


@pytest.fixture(scope="module")
def tokens(home):
    made = {}
    for name, scopes in [("client", "infer"), ("viewer", "read"), ("ops", "read,admin"), ("spare", "infer")]:
        made[name] = cli(home, "auth", "create-token", name, "--scopes", scopes).stdout.strip()
    return made


@pytest.fixture(scope="module")
def secured(frontend, home, tokens, mlp_package):
    server = ServerProcess(["churn@production", mlp_package], "--auth", "--follow-interval", "0.1", "--repository-control",
                           "--http-frontend", frontend, env={"VIVACE_HOME": str(home)})
    yield server
    assert server.stop() == 0


def test_tokens_are_stored_hashed_and_shown_once(home, tokens):
    path = home / "auth" / "tokens.json"
    text = path.read_text()
    assert all(token.startswith("vvc_") and token not in text for token in tokens.values())
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    listing = cli(home, "auth", "list").stdout
    assert "client\tinfer" in listing and "ops\tadmin,read" in listing
    assert not any(token in listing for token in tokens.values())


def test_token_cli_refuses_bad_input(home, tokens):
    assert "exists" in cli(home, "auth", "create-token", "client", check=False).stderr
    assert "scopes must be" in cli(home, "auth", "create-token", "x", "--scopes", "root", check=False).stderr
    assert "token name" in cli(home, "auth", "create-token", "a b", check=False).stderr
    assert "no token named" in cli(home, "auth", "revoke", "nobody", check=False).stderr


def test_auth_with_no_tokens_refuses_to_start(tmp_path, mlp_package):
    result = subprocess.run(
        [sys.executable, "-m", "vivace.cli", "--home", str(tmp_path), "serve", str(mlp_package), "--auth",
         "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "holds no tokens" in result.stderr


def test_health_is_open_and_everything_else_needs_a_token(secured):
    assert request(secured, "GET", "/v2/health/ready")[0] == 200
    assert request(secured, "GET", "/v2/health/live")[0] == 200
    for method, path, body in [("POST", "/v2/models/mlp/infer", BODY), ("GET", "/v2/models/mlp", None),
                               ("GET", "/metrics", None), ("GET", "/v2", None),
                               ("POST", "/v2/repository/index", None)]:
        status, headers, data = request(secured, method, path, body)
        assert status == 401, path
        assert headers["www-authenticate"].startswith("Bearer")
        assert "missing bearer token" in json.loads(data)["error"]


@pytest.mark.parametrize("header, message", [
    ("Bearer vvc_not-a-real-token", "invalid or revoked"),
    ("Basic dXNlcjpwYXNz", "Bearer scheme"),
    ("Bearer ", "invalid or revoked"),
    ("Bearer " + "A" * 4000, "invalid or revoked"),
])
def test_bad_tokens_are_refused_with_401(secured, header, message):
    status, _, data = request(secured, "POST", "/v2/models/mlp/infer", BODY, headers={"Authorization": header})
    assert status == 401 and message in json.loads(data)["error"]


def test_scopes_decide_what_a_token_may_do(secured, tokens):
    assert request(secured, "POST", "/v2/models/mlp/infer", BODY, tokens["client"])[0] == 200
    status, _, data = request(secured, "GET", "/v2/models/mlp", token=tokens["client"])
    assert status == 403 and "'read' scope" in json.loads(data)["error"]
    assert request(secured, "GET", "/v2/models/mlp", token=tokens["viewer"])[0] == 200
    assert request(secured, "GET", "/metrics", token=tokens["viewer"])[0] == 200
    status, _, data = request(secured, "POST", "/v2/models/mlp/infer", BODY, tokens["viewer"])
    assert status == 403 and "'infer' scope" in json.loads(data)["error"]
    status, _, _ = request(secured, "POST", "/v2/repository/models/churn/unload", token=tokens["viewer"])
    assert status == 403


def test_keep_alive_connection_is_checked_on_every_request(secured, tokens):
    conn = http.client.HTTPConnection("127.0.0.1", secured.port, timeout=10)
    for token, expected in [(tokens["client"], 200), (tokens["viewer"], 403), (tokens["client"], 200), (None, 401)]:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        conn.request("POST", "/v2/models/mlp/infer", body=BODY, headers=headers)
        response = conn.getresponse()
        response.read()
        assert response.status == expected
    conn.close()


def test_revoked_and_expired_tokens_stop_working_without_a_restart(secured, home, tokens):
    assert request(secured, "POST", "/v2/models/mlp/infer", BODY, tokens["spare"])[0] == 200
    cli(home, "auth", "revoke", "spare")
    deadline = time.monotonic() + 10
    while request(secured, "POST", "/v2/models/mlp/infer", BODY, tokens["spare"])[0] != 401:
        assert time.monotonic() < deadline, "revoked token still accepted"
        time.sleep(0.1)
    short = cli(home, "auth", "create-token", "short", "--expires-days", str(2 / 86400)).stdout.strip()
    deadline = time.monotonic() + 10
    while True:  # accepted once the server reloaded the token file, refused once it expired
        status, _, data = request(secured, "POST", "/v2/models/mlp/infer", BODY, short)
        if status == 401 and "expired" in json.loads(data)["error"]:
            break
        assert status in (200, 401) and time.monotonic() < deadline
        time.sleep(0.1)


def test_revocation_and_new_tokens_apply_within_a_second_whatever_the_http_timeouts(home, mlp_package):
    # Long HTTP timeouts make the server's sweep tick every 15 s: the token file must be
    # watched on its own short timer (this took up to the sweep period before).
    token = cli(home, "auth", "create-token", "fleeting", "--scopes", "infer").stdout.strip()
    server = ServerProcess([mlp_package], "--auth", "--header-timeout", "80", "--body-timeout", "80",
                           env={"VIVACE_HOME": str(home)})
    try:
        assert request(server, "POST", "/v2/models/mlp/infer", BODY, token)[0] == 200

        def seconds_until(status_wanted, token):
            start = time.monotonic()
            while request(server, "POST", "/v2/models/mlp/infer", BODY, token)[0] != status_wanted:
                assert time.monotonic() - start < 5, "the token file change was not picked up"
                time.sleep(0.02)
            return time.monotonic() - start

        cli(home, "auth", "revoke", "fleeting")
        revoked_after = seconds_until(401, token)
        fresh = cli(home, "auth", "create-token", "fresh", "--scopes", "infer").stdout.strip()
        usable_after = seconds_until(200, fresh)
        # Generous against a busy machine; the sweep's period (15 s) would fail it.
        assert revoked_after < 2 and usable_after < 2, (revoked_after, usable_after)
    finally:
        assert server.stop() == 0


def test_refusals_are_audited_without_the_token(secured, home, tokens):
    request(secured, "GET", "/v2/models/mlp", token="vvc_guess")
    request(secured, "POST", "/v2/models/mlp/infer", BODY, tokens["viewer"])
    events = audit_events(home)
    denied = [e for e in events if e["event"] == "auth.denied" and e["path"] == "/v2/models/mlp"]
    forbidden = [e for e in events if e["event"] == "auth.forbidden" and e["token"] == "viewer"]
    assert denied and forbidden
    assert denied[-1]["remote"].startswith("127.0.0.1:") and denied[-1]["status"] == 401
    text = (home / "audit" / "server.jsonl").read_text()
    assert "vvc_guess" not in text and not any(token in text for token in tokens.values())


def served_version(server, token, model="churn"):
    status, _, data = request(server, "POST", f"/v2/models/{model}/infer", BODY, token)
    return status, json.loads(data).get("model_version")


def test_repository_index_unload_load_and_alias_are_admin_actions(secured, home, tokens):
    status, _, data = request(secured, "POST", "/v2/repository/index", token=tokens["viewer"])
    assert status == 200
    assert {(m["name"], m["state"]) for m in json.loads(data)} == {("churn", "READY"), ("mlp", "READY")}

    status, _, data = request(secured, "POST", "/v2/repository/models/churn/unload", token=tokens["ops"])
    assert status == 200 and json.loads(data)["unloaded"] == ["1"]
    assert served_version(secured, tokens["client"])[0] == 404
    assert served_version(secured, tokens["client"], "mlp")[0] == 200  # other models keep serving

    body = json.dumps({"parameters": {"ref": "churn@production"}})
    status, _, data = request(secured, "POST", "/v2/repository/models/churn/load", body, tokens["ops"])
    assert status == 200 and json.loads(data)["version"] == "1"
    assert served_version(secured, tokens["client"]) == (200, "1")

    body = json.dumps({"parameters": {"alias": "production", "version": 2}})
    status, _, data = request(secured, "POST", "/v2/repository/models/churn/alias", body, tokens["ops"])
    assert status == 200 and json.loads(data)["previous"] == 1
    deadline = time.monotonic() + 10
    while served_version(secured, tokens["client"]) != (200, "2"):  # the loaded alias is followed
        assert time.monotonic() < deadline, "server did not follow the alias it loaded"
        time.sleep(0.1)

    events = [e for e in audit_events(home) if e["event"].startswith("admin.")]
    assert [(e["event"], e["status"], e["token"]) for e in events[-3:]] == [
        ("admin.unload", 200, "ops"), ("admin.load", 200, "ops"), ("admin.alias", 200, "ops")]
    db = sqlite3.connect(home / "vivace.db")
    reason = db.execute("SELECT reason FROM audit WHERE action = 'model.alias' ORDER BY rowid DESC").fetchone()[0]
    assert "ops" in reason


@pytest.mark.parametrize("path, body, status, message", [
    ("/v2/repository/models/churn/load", '{"parameters": {"ref": "other@production"}}', 400, "parameters.ref"),
    ("/v2/repository/models/churn/load", '{"parameters": {"ref": "/etc/passwd"}}', 400, "parameters.ref"),
    ("/v2/repository/models/churn/load", '{"parameters": {"ref": "churn/9"}}', 404, "churn"),
    ("/v2/repository/models/ghost/load", "", 404, "ghost"),
    ("/v2/repository/models/churn/load", '{"parameters": [1]', 400, "JSON object"),
    ("/v2/repository/models/churn/load", '{"params": {}}', 400, "JSON object"),
    ("/v2/repository/models/ghost/unload", "", 404, "unknown model"),
    ("/v2/repository/models/churn/alias", '{"parameters": {"alias": "production"}}', 400, "version"),
    ("/v2/repository/models/churn/alias", '{"parameters": {"alias": "production", "version": 7}}', 404, "7"),
    ("/v2/repository/models/churn/alias", '{"parameters": {"alias": "latest", "version": 1}}', 400, "reserved"),
])
def test_bad_admin_requests_get_clear_errors(secured, tokens, path, body, status, message):
    got, _, data = request(secured, "POST", path, body, tokens["ops"])
    assert got == status and message in json.loads(data)["error"]
    assert request(secured, "GET", "/v2/repository/models/churn/load", token=tokens["ops"])[0] == 405


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    folder = tmp_path_factory.mktemp("tls")
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return folder / "cert.pem", folder / "key.pem", client


def test_tls_serves_https_with_the_given_certificate(tls_files, mlp_package):
    cert, key, client = tls_files
    server = ServerProcess([mlp_package], "--tls-cert", str(cert), "--tls-key", str(key), tls=client)
    try:
        status, _, data = request(server, "POST", "/v2/models/mlp/infer", BODY, context=client)
        assert status == 200 and len(json.loads(data)["outputs"][0]["data"]) == 1
        # A client that does not trust the certificate cannot talk to it...
        with pytest.raises(ssl.SSLError):
            request(server, "GET", "/v2/health/ready", context=ssl.create_default_context())
        # ...nor can plain HTTP: it gets no HTTP response, and the server keeps serving.
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n")
            assert not sock.recv(100).startswith(b"HTTP/1.1 200")
        assert request(server, "GET", "/v2/health/ready", context=client)[0] == 200
    finally:
        assert server.stop() == 0


@pytest.mark.parametrize("extra, message", [
    (["--tls-cert", "CERT"], "both a certificate"),
    (["--tls-cert", "CERT", "--tls-key", "CERT"], "cannot load the TLS certificate"),
])
def test_tls_misconfiguration_is_a_clear_error(tls_files, mlp_package, extra, message):
    cert = str(tls_files[0])
    args = [a.replace("CERT", cert) for a in extra]
    result = subprocess.run(
        [sys.executable, "-m", "vivace.cli", "serve", str(mlp_package), "--port", str(free_port()), *args],
        capture_output=True, text=True, timeout=60, env=dict(os.environ))
    assert result.returncode == 1 and message in result.stderr


def test_unknown_models_are_not_revealed_before_authentication(secured, tokens):
    status, _, data = request(secured, "GET", "/v2/models/secret-model")
    assert status == 401  # not 404: the name's existence is not disclosed
    assert request(secured, "GET", "/v2/models/secret-model", token=tokens["viewer"])[0] == 404


def test_model_control_is_off_unless_asked_for(mlp_package, tmp_path):
    server = ServerProcess([mlp_package], env={"VIVACE_HOME": str(tmp_path)})
    try:
        for action in ("load", "unload", "alias"):
            status, _, data = request(server, "POST", f"/v2/repository/models/mlp/{action}")
            assert status == 403 and "--repository-control" in json.loads(data)["error"]
        assert request(server, "POST", "/v2/repository/index")[0] == 200  # reading the index is fine
    finally:
        assert server.stop() == 0
    result = subprocess.run(
        [sys.executable, "-m", "vivace.cli", "serve", str(mlp_package), "--workers", "2",
         "--repository-control", "--port", str(free_port())], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "single process" in result.stderr


@pytest.mark.parametrize("name, ref", [(".", "./1"), ("..", "../1"), ("m", "m/1")])
def test_loads_never_reach_the_file_system(secured, tokens, tmp_path, name, ref):
    """A directory named like the reference must not be loaded as a package."""
    status, _, data = request(secured, "POST", f"/v2/repository/models/{name}/load",
                              json.dumps({"parameters": {"ref": ref}}), tokens["ops"])
    assert status in (400, 404) and "error" in json.loads(data)


def test_expect_continue_without_a_token_is_refused_before_the_body(secured, tokens):
    head = (b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nExpect: 100-continue\r\n" % len(BODY))
    with socket.create_connection(("127.0.0.1", secured.port), timeout=5) as sock:
        sock.sendall(head + b"\r\n")  # the body is never sent
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 401") and b"www-authenticate: Bearer" in reply
    with socket.create_connection(("127.0.0.1", secured.port), timeout=5) as sock:
        sock.sendall(head + b"Authorization: Bearer %s\r\n\r\n" % tokens["client"].encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 100 Continue")
        sock.sendall(BODY.encode())
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
