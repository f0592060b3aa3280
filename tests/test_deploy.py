"""`vivace deploy render`: manifests from the registry, validated offline.

A real registry (SQLite, stored packages) is rendered for each target and environment;
the objects are checked against Kubernetes' schemas (kubernetes-validate, strict) and the
vendored KServe and prometheus-operator CRDs (tests/schemas/), and the k8s tree is
rendered by `kubectl kustomize` and compared with what `vivace deploy render` printed.
"""
from __future__ import annotations

import copy
import gzip
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vivace.engine import deploy

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = Path(__file__).resolve().parent / "schemas"
CRDS = {
    ("serving.kserve.io", "InferenceService"): SCHEMAS / "kserve" / "serving.kserve.io_inferenceservices.yaml.gz",
    ("serving.kserve.io", "ServingRuntime"): SCHEMAS / "kserve" / "serving.kserve.io_servingruntimes.yaml.gz",
    ("monitoring.coreos.com", "ServiceMonitor"):
        SCHEMAS / "prometheus-operator" / "monitoring.coreos.com_servicemonitors.yaml.gz",
}


def vivace(home, *args, check=True):
    proc = subprocess.run([sys.executable, "-m", "vivace.cli", "--home", str(home), *map(str, args)],
                          capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def home(tmp_path_factory, mlp_package):
    """A registry with churn/1 and churn/2 (different packages), @production on 1."""
    import torch

    from vivace.registry.package import load_package, write_package

    home = tmp_path_factory.mktemp("home")
    vivace(home, "models", "register", mlp_package, "--name", "churn")
    other = tmp_path_factory.mktemp("other") / "pkg"
    model_file = tmp_path_factory.mktemp("pt") / "model.pt"
    torch.jit.trace(torch.nn.Linear(32, 1), torch.zeros(2, 32)).save(str(model_file))
    write_package(other, load_package(mlp_package).manifest(), {"model.pt": model_file})
    vivace(home, "models", "register", other, "--name", "churn")
    vivace(home, "models", "alias", "churn", "1", "production")
    return home


def package_sha(home, version):
    from vivace.registry.models import get_version

    return get_version(home, f"churn/{version}").package_sha


# ---- schemas -------------------------------------------------------------------------


def _strict(schema):
    """A CRD's structural schema with unknown fields refused (the API server prunes them
    silently, which would hide a misspelt field)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if ("properties" in schema and "additionalProperties" not in schema
                and not schema.get("x-kubernetes-preserve-unknown-fields")):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def crd_validator(group, kind, version):
    import jsonschema

    crd = yaml.safe_load(gzip.decompress(CRDS[(group, kind)].read_bytes()))
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return jsonschema.Draft7Validator(_strict(served["schema"]["openAPIV3Schema"]))


def schema_errors(obj) -> list[str]:
    """Every way `obj` breaks its kind's schema (empty: valid)."""
    group, _, version = obj["apiVersion"].rpartition("/")
    if (group, obj["kind"]) in CRDS:
        validator = crd_validator(group, obj["kind"], version)
        return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def test_the_validators_catch_what_they_must():
    """Each validator refuses a misspelt field and a wrong type (else a pass proves nothing)."""
    for obj in [*deploy.kserve_objects(deploy.EXAMPLE, deploy.ENVIRONMENTS["prod"], "vivace:x"),
                *deploy.k8s_objects(deploy.EXAMPLE, deploy.ENVIRONMENTS["prod"], "vivace:x")]:
        assert schema_errors(obj) == [], obj["kind"]
        misspelt = copy.deepcopy(obj)
        misspelt["spec"]["replicaz"] = 3
        assert schema_errors(misspelt), f"{obj['kind']}: an unknown spec field passed"
    isvc = deploy.inference_service(deploy.EXAMPLE, deploy.ENVIRONMENTS["prod"])
    isvc["spec"]["predictor"]["minReplicas"] = "three"
    assert any("minReplicas" in e for e in schema_errors(isvc))
    runtime = deploy.serving_runtime("vivace:x", "ns")
    runtime["spec"]["containers"][0]["readinessProbe"]["httpGet"]["path"] = 7
    assert schema_errors(runtime)
    hpa = deploy.autoscaler(deploy.EXAMPLE, deploy.ENVIRONMENTS["prod"])
    hpa["spec"]["metrics"][0]["type"] = 7
    assert schema_errors(hpa)


# ---- rendering from the registry -----------------------------------------------------


def test_kserve_render_pins_the_alias_to_its_version_and_package(home):
    proc = vivace(home, "deploy", "render", "churn@production", "--target", "kserve", "--env", "prod",
                  "--storage-uri", "s3://models-bucket/vivace", "--image", "registry.local:5000/vivace:0.1.0")
    runtime, isvc = yaml.safe_load_all(proc.stdout)
    sha = package_sha(home, 1)
    assert f"churn@production -> churn/1, package sha256 {sha}" in proc.stderr
    for obj in (runtime, isvc):
        assert schema_errors(obj) == [], obj["kind"]
        assert obj["metadata"]["namespace"] == "vivace-prod"
    # The runtime: OIP v2 on 8080, the model from /mnt/models, probes, scrape annotations.
    assert runtime["kind"] == "ServingRuntime" and runtime["spec"]["protocolVersions"] == ["v2"]
    (container,) = runtime["spec"]["containers"]
    assert container["image"] == "registry.local:5000/vivace:0.1.0"
    assert container["args"] == ["serve", "/mnt/models", "--host", "0.0.0.0", "--port", "8080"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}
    assert container["securityContext"]["runAsNonRoot"] is True
    assert runtime["spec"]["annotations"]["prometheus.kserve.io/port"] == "8080"
    assert runtime["spec"]["annotations"]["prometheus.io/path"] == "/metrics"
    # The InferenceService: the immutable artifact, and the server told to refuse any other.
    model = isvc["spec"]["predictor"]["model"]
    assert model["runtime"] == "vivace" and model["modelFormat"] == {"name": "vivace", "version": "1"}
    assert model["storageUri"] == f"s3://models-bucket/vivace/packages/{sha}"
    assert model["args"] == ["--model-name", "churn", "--model-version", "1", "--expect-sha256", sha]
    assert isvc["metadata"]["annotations"]["vivace/model-ref"] == "churn@production"
    env = deploy.ENVIRONMENTS["prod"]
    assert (isvc["spec"]["predictor"]["minReplicas"], isvc["spec"]["predictor"]["maxReplicas"]) == \
        (env.replicas, env.max_replicas)
    assert model["resources"]["limits"] == {"cpu": env.cpu_limit, "memory": env.memory_limit}


def test_a_moved_alias_renders_the_new_version(home, tmp_path):
    """Manifests pin: after the alias moves, a new render names the new version and package."""
    copy_home = tmp_path / "home"
    shutil.copytree(home, copy_home)
    vivace(copy_home, "models", "alias", "churn", "2", "production")
    proc = vivace(copy_home, "deploy", "render", "churn@production", "--target", "kserve", "--env", "dev")
    isvc = list(yaml.safe_load_all(proc.stdout))[1]
    sha2 = package_sha(copy_home, 2)
    assert sha2 != package_sha(copy_home, 1)
    assert isvc["spec"]["predictor"]["model"]["args"][3] == "2"
    assert isvc["spec"]["predictor"]["model"]["storageUri"] == f"pvc://vivace-artifacts/packages/{sha2}"
    assert isvc["metadata"]["namespace"] == "vivace-dev"


def kubectl_with_kustomize_v4():
    """kubectl >= 1.21 (kustomize v4+: `resources` naming a folder, `patches`); Debian's
    apt package is 1.20, whose kustomize v2 reads neither."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    proc = subprocess.run([kubectl, "version", "--client", "-o", "json"], capture_output=True, text=True)
    try:
        minor = int(re.match(r"\d+", json.loads(proc.stdout)["clientVersion"]["minor"])[0])
    except (ValueError, KeyError, TypeError):
        return None
    return kubectl if minor >= 21 else None


@pytest.mark.parametrize("env", sorted(deploy.ENVIRONMENTS))
def test_k8s_tree_renders_with_kustomize_to_the_printed_objects(home, tmp_path, env):
    out = tmp_path / "manifests"
    written = vivace(home, "deploy", "render", "churn@production", "--target", "k8s", "--env", env,
                     "--out", out, "--storage-uri", "pvc://shared-models/registry")
    assert f"kubectl apply -k {out / 'overlays' / env}" in written.stderr
    printed = list(yaml.safe_load_all(vivace(home, "deploy", "render", "churn@production", "--target", "k8s",
                                             "--env", env, "--storage-uri", "pvc://shared-models/registry").stdout))
    kinds = sorted(o["kind"] for o in printed)
    assert kinds == ["Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "ServiceMonitor"]
    for obj in printed:
        assert schema_errors(obj) == [], obj["kind"]
        assert obj["metadata"]["namespace"] == f"vivace-{env}"
    by_kind = {o["kind"]: o for o in printed}
    sha = package_sha(home, 1)
    pod = by_kind["Deployment"]["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["args"][:2] == ["deploy", "fetch"]
    assert {e["name"]: e["value"] for e in init["env"]} == {
        "VIVACE_MODEL_URI": f"/mnt/artifacts/registry/packages/{sha}", "VIVACE_PACKAGE_SHA256": sha}
    assert {"name": "artifacts", "persistentVolumeClaim": {"claimName": "shared-models", "readOnly": True}} \
        in pod["volumes"]
    serve_env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert serve_env["VIVACE_MODEL_VERSION"] == "1" and serve_env["VIVACE_PACKAGE_SHA256"] == sha
    assert by_kind["Deployment"]["spec"]["replicas"] == deploy.ENVIRONMENTS[env].replicas
    hpa = by_kind["HorizontalPodAutoscaler"]["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "vivace_queue_depth"
    assert hpa["maxReplicas"] == deploy.ENVIRONMENTS[env].max_replicas
    assert by_kind["ServiceMonitor"]["spec"]["endpoints"][0]["path"] == "/metrics"
    kubectl = kubectl_with_kustomize_v4()
    if kubectl is None:
        pytest.skip("no kubectl >= 1.21 for `kubectl kustomize` (the objects were validated above)")
    rendered = subprocess.run([kubectl, "kustomize", str(out / "overlays" / env)], capture_output=True, text=True,
                              timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    assert "Warning" not in rendered.stderr, rendered.stderr  # no deprecated kustomize fields

    def key(o):
        return o["kind"], o["metadata"]["name"]

    assert sorted(yaml.safe_load_all(rendered.stdout), key=key) == sorted(printed, key=key)


def test_the_repository_deploy_folder_is_what_render_writes(tmp_path):
    deploy.write_examples(tmp_path)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.yaml"))
    shipped = sorted(p.relative_to(ROOT / "deploy") for p in (ROOT / "deploy").rglob("*.yaml")
                     if p.parent != ROOT / "deploy")
    assert shipped == generated
    for rel in generated:
        assert (ROOT / "deploy" / rel).read_text() == (tmp_path / rel).read_text(), (
            f"deploy/{rel} differs from engine/deploy.py's output: regenerate with "
            "python -c \"from vivace.engine.deploy import write_examples; write_examples('deploy')\"")


def test_prometheus_adapter_rules_serve_the_metric_the_hpa_scales_on():
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus-adapter-rules.yaml").read_text())["rules"]
    served = {r["name"]["as"]: r for r in rules}
    hpa = deploy.autoscaler(deploy.EXAMPLE, deploy.ENVIRONMENTS["prod"])
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert metric in served and served[metric]["seriesQuery"].startswith(f"{metric}{{")
    from vivace.monitor import metrics

    assert f'"{metric}"' in Path(metrics.__file__).read_text()  # the server exports it


# ---- bad input: one line, nothing written --------------------------------------------


def one_line_error(proc) -> str:
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vivace deploy: error: "), proc.stderr
    assert proc.stdout == ""
    return lines[0]


@pytest.mark.parametrize("args, message", [
    (["nosuch@production", "--target", "k8s", "--env", "prod"], "unknown model 'nosuch'"),
    (["churn@canary", "--target", "k8s", "--env", "prod"], "has no alias 'canary' (aliases: production)"),
    (["churn/9", "--target", "kserve", "--env", "prod"], "has no version 9"),
    (["churn@production", "--target", "k8s", "--env", "qa"], "unknown environment 'qa' (known: dev, staging, prod)"),
    (["churn@production", "--target", "helm", "--env", "prod"], "unknown target 'helm'"),
    (["churn@production", "--target", "k8s", "--env", "prod", "--storage-uri", "file:///srv/models"],
     "a cluster reads packages from s3://, gs://, pvc://"),
    (["churn@production", "--target", "k8s", "--env", "prod", "--storage-uri", "pvc://Not_A_Claim/x"],
     "is not a PersistentVolumeClaim name"),
    (["churn@production", "--target", "k8s", "--env", "prod", "--name", "Churn_1"], "is not a Kubernetes name"),
])
def test_bad_render_input_is_one_line_and_writes_nothing(home, tmp_path, args, message):
    out = tmp_path / "out"
    line = one_line_error(vivace(home, "deploy", "render", *args, "--out", out, check=False))
    assert message in line
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_no_registry_is_an_error_and_creates_no_home(tmp_path):
    missing = tmp_path / "nohome"
    line = one_line_error(vivace(missing, "deploy", "render", "churn@production", "--target", "k8s", "--env", "dev",
                                 check=False))
    assert "no Vivace registry at" in line and not missing.exists()


def test_unwritable_out_leaves_everything_as_it_was(home, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for out in (blocker, blocker / "sub"):
        line = one_line_error(vivace(home, "deploy", "render", "churn@production", "--target", "k8s", "--env", "prod",
                                     "--out", out, check=False))
        assert str(out) in line
    assert blocker.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    # Into an existing tree where one target cannot be written: no file changes, none is added.
    out = tmp_path / "tree"
    vivace(home, "deploy", "render", "churn@production", "--target", "k8s", "--env", "dev", "--out", out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (out / "overlays" / "prod").write_text("not a folder")
    copy_home = tmp_path / "home2"
    shutil.copytree(home, copy_home)
    vivace(copy_home, "models", "alias", "churn", "2", "production")  # the base would change too
    one_line_error(vivace(copy_home, "deploy", "render", "churn@production", "--target", "k8s", "--env", "prod",
                          "--out", out, check=False))
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == {**before, out / "overlays" / "prod": b"not a folder"}


def test_a_corrupted_stored_package_is_never_rendered(home, tmp_path):
    copy_home = tmp_path / "home"
    shutil.copytree(home, copy_home)
    stored = copy_home / "packages" / package_sha(copy_home, 1) / "model.pt"
    stored.chmod(0o644)
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    line = one_line_error(vivace(copy_home, "deploy", "render", "churn@production", "--target", "kserve",
                                 "--env", "prod", check=False))
    assert "model.pt is corrupted" in line

