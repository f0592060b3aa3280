"""Registry artifacts in object storage, against a real S3-compatible server on loopback
(moto's server mode, with IAM authentication on): publish, fetch verified through a local
content-addressed cache; interrupted uploads, corrupted objects, missing artifacts and
wrong credentials each end in one line on stderr with nothing half-written."""
from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import free_port

pytest.importorskip("s3fs", reason="the s3 extra (s3fs) is not installed")
pytest.importorskip("moto.server", reason="moto[server] is not installed")

BUCKET = "models"
PREFIX = f"s3://{BUCKET}/vivace"
# writer may do anything; partial may not upload one of the package's files (an upload
# that breaks off half-way, as a killed process or a lost connection would leave it).
POLICIES = {
    "writer": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
    "partial": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
                {"Effect": "Deny", "Action": "s3:PutObject", "Resource": f"arn:aws:s3:::{BUCKET}/*/zz-weights.bin"}],
}


class S3Server:
    def __init__(self, tmp_path):
        self.endpoint = f"http://127.0.0.1:{free_port()}"
        port = self.endpoint.rsplit(":", 1)[1]
        # The first requests (creating the users and their keys) pass without credentials;
        # every one after them is authenticated and authorized against the IAM policies.
        bootstrap = 3 * len(POLICIES)
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", port],
                                     env=dict(os.environ, INITIAL_NO_AUTH_ACTION_COUNT=str(bootstrap)),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, "moto server exited"
            try:
                socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
        self.keys = {}
        for user, statements in POLICIES.items():
            iam.create_user(UserName=user)
            key = iam.create_access_key(UserName=user)["AccessKey"]
            self.keys[user] = (key["AccessKeyId"], key["SecretAccessKey"])
            iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(
                {"Version": "2012-10-17", "Statement": statements}))
        self.client().create_bucket(Bucket=BUCKET)

    def env(self, user="writer"):
        key, secret = self.keys.get(user, ("AKIAWRONGWRONGWRONG", "wrong"))
        return {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret, "AWS_ENDPOINT_URL": self.endpoint,
                "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
                "AWS_CONFIG_FILE": os.devnull, "AWS_SHARED_CREDENTIALS_FILE": os.devnull}

    def client(self):
        import boto3

        key, secret = self.keys["writer"]
        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=key, aws_secret_access_key=secret)

    def keys_under(self, prefix):
        listed = self.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"][len(prefix):] for o in listed)


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = S3Server(tmp_path_factory.mktemp("moto"))
    yield server
    server.proc.terminate()
    server.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def registered(tmp_path_factory, mlp_package):
    """A registry holding churn/1, a package of three files; returns (home, package id)."""
    from vivace.registry.package import load_package, write_package

    package = tmp_path_factory.mktemp("pkg") / "churn"
    write_package(package, load_package(mlp_package).manifest(),
                  {"model.pt": mlp_package / "model.pt", "zz-weights.bin": os.urandom(300_000)})
    home = tmp_path_factory.mktemp("home")
    assert vivace(home, "models", "register", package, "--name", "churn").returncode == 0
    assert vivace(home, "models", "alias", "churn", "1", "production").returncode == 0
    return home, hashlib.sha256((package / "package.json").read_bytes()).hexdigest()


def vivace(home, *args, env=None):
    return subprocess.run([sys.executable, "-m", "vivace.cli", "--home", str(home), *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=dict(os.environ, **(env or {})))


def one_line_error(proc) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vivace deploy: error: "), proc.stderr
    return lines[0]


def holds_nothing(folder) -> bool:
    return not folder.exists() or list(folder.iterdir()) == []


def files_of(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_publish_then_fetch_through_the_cache(s3, registered, tmp_path):
    home, sha = registered
    prefix = f"{PREFIX}/publish"
    proc = vivace(home, "deploy", "publish", "churn@production", "--storage-uri", prefix, env=s3.env())
    assert proc.returncode == 0, proc.stderr
    uri = proc.stdout.strip()
    assert uri == f"{prefix}/packages/{sha}"
    assert s3.keys_under(f"vivace/publish/packages/{sha}/") == ["model.pt", "package.json", "zz-weights.bin"]
    stored = files_of(home / "packages" / sha)
    cache = tmp_path / "cache"
    dest = tmp_path / "mnt" / "models"
    proc = vivace(home, "deploy", "fetch", uri, dest, "--sha256", sha, "--cache", cache, env=s3.env())
    assert proc.returncode == 0, proc.stderr
    assert files_of(dest) == stored and files_of(cache / "packages" / sha) == stored
    assert list((cache / "tmp").iterdir()) == []
    # The cache answers once the bucket no longer has the package (and is verified on use).
    s3.client().delete_object(Bucket=BUCKET, Key=f"vivace/publish/packages/{sha}/model.pt")
    again = tmp_path / "again"
    assert vivace(home, "deploy", "fetch", uri, again, "--sha256", sha, "--cache", cache,
                  env=s3.env()).returncode == 0
    assert files_of(again) == stored
    # Publishing again restores what the bucket lost.
    assert vivace(home, "deploy", "publish", "churn/1", "--storage-uri", prefix, env=s3.env()).returncode == 0
    fresh = tmp_path / "fresh"
    assert vivace(home, "deploy", "fetch", uri, fresh, "--sha256", sha, env=s3.env()).returncode == 0
    assert files_of(fresh) == stored


def test_an_interrupted_upload_is_never_fetched_and_publishing_again_completes_it(s3, registered, tmp_path):
    home, sha = registered
    prefix = f"{PREFIX}/interrupted"
    line = one_line_error(vivace(home, "deploy", "publish", "churn@production", "--storage-uri", prefix,
                                 env=s3.env("partial")))
    assert "access denied" in line and "check the storage credentials" in line
    assert s3.keys_under(f"vivace/interrupted/packages/{sha}/") == ["model.pt"]  # no package.json
    dest = tmp_path / "dest"
    line = one_line_error(vivace(home, "deploy", "fetch", f"{prefix}/packages/{sha}", dest, "--sha256", sha,
                                 "--cache", tmp_path / "cache", env=s3.env()))
    assert "no package at" in line and "upload was interrupted" in line
    assert holds_nothing(dest) and holds_nothing(tmp_path / "cache" / "packages")
    assert vivace(home, "deploy", "publish", "churn@production", "--storage-uri", prefix,
                  env=s3.env()).returncode == 0
    assert vivace(home, "deploy", "fetch", f"{prefix}/packages/{sha}", dest, "--sha256", sha,
                  "--cache", tmp_path / "cache", env=s3.env()).returncode == 0
    assert files_of(dest) == files_of(home / "packages" / sha)


def test_a_corrupted_object_is_refused_and_nothing_is_kept(s3, registered, tmp_path):
    home, sha = registered
    prefix = f"{PREFIX}/corrupted"
    assert vivace(home, "deploy", "publish", "churn@production", "--storage-uri", prefix,
                  env=s3.env()).returncode == 0
    key = f"vivace/corrupted/packages/{sha}/zz-weights.bin"
    data = bytearray(s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0x01
    s3.client().put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    dest, cache = tmp_path / "dest", tmp_path / "cache"
    line = one_line_error(vivace(home, "deploy", "fetch", f"{prefix}/packages/{sha}", dest, "--sha256", sha,
                                 "--cache", cache, env=s3.env()))
    assert f"{prefix}/packages/{sha}/zz-weights.bin is corrupted" in line
    assert holds_nothing(dest) and holds_nothing(cache / "packages") and holds_nothing(cache / "tmp")
    # A substituted package.json (another package under this id) is refused before any file.
    s3.client().put_object(Bucket=BUCKET, Key=f"vivace/corrupted/packages/{sha}/package.json", Body=b"{}")
    line = one_line_error(vivace(home, "deploy", "fetch", f"{prefix}/packages/{sha}", dest, "--sha256", sha,
                                 env=s3.env()))
    assert "the release pins" in line and not (dest / "package.json").exists()


def test_missing_artifacts_and_wrong_credentials(s3, registered, tmp_path):
    home, sha = registered
    prefix = f"{PREFIX}/missing"
    dest = tmp_path / "dest"
    line = one_line_error(vivace(home, "deploy", "fetch", f"{prefix}/packages/{sha}", dest, "--sha256", sha,
                                 env=s3.env()))
    assert f"no package at {prefix}/packages/{sha}" in line
    assert vivace(home, "deploy", "publish", "churn@production", "--storage-uri", prefix,
                  env=s3.env()).returncode == 0
    s3.client().delete_object(Bucket=BUCKET, Key=f"vivace/missing/packages/{sha}/zz-weights.bin")
    line = one_line_error(vivace(home, "deploy", "fetch", f"{prefix}/packages/{sha}", dest, "--sha256", sha,
                                 env=s3.env()))
    assert "zz-weights.bin is missing (listed in package.json)" in line
    for command in (["fetch", f"{prefix}/packages/{sha}", dest, "--sha256", sha],
                    ["publish", "churn@production", "--storage-uri", f"{PREFIX}/wrong-keys"]):
        line = one_line_error(vivace(home, "deploy", *command, env=s3.env("nobody")))
        assert "check the storage credentials" in line
    assert not (dest / "package.json").exists()
    assert s3.keys_under("vivace/wrong-keys/") == []
    line = one_line_error(vivace(home, "deploy", "publish", "nosuch@production", "--storage-uri", prefix,
                                 env=s3.env()))
    assert "unknown model 'nosuch'" in line


def test_dataset_objects_round_trip_through_the_cache(s3, tmp_path, monkeypatch):
    import numpy as np
    import pandas as pd

    from vivace.registry.data import add_dataset
    from vivace.registry.remote import ArtifactCache, publish_dataset
    from vivace.registry.store import IntegrityError, NotFoundError

    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    source = tmp_path / "rows.parquet"
    pd.DataFrame({"x": np.arange(1000.0), "y": np.arange(1000) % 2}).to_parquet(source)
    version, _ = add_dataset(tmp_path / "home", "rows", source)
    prefix = f"{PREFIX}/datasets"
    uris = publish_dataset(tmp_path / "home", "rows@v1", prefix)
    (digest,) = version.files.values()
    assert uris == [f"{prefix}/objects/{digest[:2]}/{digest}"]
    cache = ArtifactCache(tmp_path / "cache")
    assert cache.object(prefix, digest).read_bytes() == source.read_bytes()
    # Corrupted in the bucket and gone from the cache: refused, and the cache keeps nothing.
    (tmp_path / "cache" / "objects" / digest[:2] / digest).chmod(0o644)
    (tmp_path / "cache" / "objects" / digest[:2] / digest).write_bytes(b"damaged")
    s3.client().put_object(Bucket=BUCKET, Key=f"vivace/datasets/objects/{digest[:2]}/{digest}", Body=b"tampered")
    with pytest.raises(IntegrityError, match="is corrupted"):
        cache.object(prefix, digest)
    assert not (tmp_path / "cache" / "objects" / digest[:2] / digest).exists()
    with pytest.raises(NotFoundError, match="no object at"):
        cache.object(prefix, hashlib.sha256(b"never stored").hexdigest())


def expand(args, env):
    """Kubernetes' $(VAR) expansion of container args from the container's env."""
    values = {e["name"]: e["value"] for e in env}
    return [re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: values.get(m[1], m[0]), a) for a in args]


def on_loopback(args, models):
    """A container's args as they run here: /mnt/models -> `models`, on loopback, without
    --port (ServerProcess picks a free one)."""
    swap = {"/mnt/models": str(models), "0.0.0.0": "127.0.0.1"}
    out = [swap.get(a, a) for a in args]
    if "--port" in out:
        at = out.index("--port")
        assert out[at + 1] == "8080"
        del out[at:at + 2]
    return out


@pytest.mark.parametrize("target", ["k8s", "kserve"])
def test_the_rendered_pod_commands_fetch_and_serve_the_pinned_release(s3, registered, tmp_path, target):
    """Run the rendered containers' own commands (the image's entry point is `vivace`):
    the fetch from the bucket, then the server, which answers as churn version 1."""
    import urllib.request

    import yaml

    from conftest import ServerProcess

    home, sha = registered
    prefix = f"{PREFIX}/e2e"
    assert vivace(home, "deploy", "publish", "churn@production", "--storage-uri", prefix,
                  env=s3.env()).returncode == 0
    rendered = vivace(home, "deploy", "render", "churn@production", "--target", target, "--env", "prod",
                      "--storage-uri", prefix)
    objects = {o["kind"]: o for o in yaml.safe_load_all(rendered.stdout)}
    models = tmp_path / "models"
    if target == "k8s":
        pod = objects["Deployment"]["spec"]["template"]["spec"]
        (init,) = pod["initContainers"]
        fetch = on_loopback(expand(init["args"], init["env"]), models)
        serve_container = pod["containers"][0]
        serve = expand(serve_container["args"], serve_container["env"])
    else:
        model = objects["InferenceService"]["spec"]["predictor"]["model"]
        # KServe's storage initializer copies storageUri into /mnt/models; fetch does the same, verified.
        fetch = ["deploy", "fetch", model["storageUri"], str(models), "--sha256", sha]
        serve = objects["ServingRuntime"]["spec"]["containers"][0]["args"] + model["args"]
    assert fetch[:2] == ["deploy", "fetch"] and serve[0] == "serve"
    proc = vivace(home, *fetch, env=s3.env())
    assert proc.returncode == 0, proc.stderr
    serve = on_loopback(serve, models)
    server = ServerProcess([], *serve[1:], env={"VIVACE_HOME": str(tmp_path / "pod-home")})
    try:
        with urllib.request.urlopen(f"{server.url}/v2/models/churn") as response:
            assert json.loads(response.read())["versions"] == ["1"]
    finally:
        assert server.stop() == 0
