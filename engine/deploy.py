"""`vivace deploy`: Kubernetes and KServe manifests for a registered model, as code.

`vivace deploy render NAME@ALIAS --target kserve|k8s --env dev|staging|prod` resolves the
reference through the registry to one immutable release — name, version, package id
(the SHA-256 of its package.json, which pins every file) and the package's URI in shared
storage — and writes the objects that serve it:

- kserve: a `ServingRuntime` (Open Inference Protocol v2, model in /mnt/models, port 8080,
  readiness and liveness probes, Prometheus scrape annotations), modelled on KServe's own
  Triton runtime, and an `InferenceService` whose storageUri is the package's URI;
- k8s: a kustomize tree, `base/` (Deployment, Service, HorizontalPodAutoscaler on the
  `vivace_queue_depth` metric, PodDisruptionBudget, ServiceMonitor) and
  `overlays/ENV/` (replicas, limits, scaling bounds, image, and the release).

`vivace deploy publish NAME@ALIAS --storage-uri PREFIX` uploads the package there first;
`vivace deploy fetch` is what the k8s init container runs (registry/remote.py).

The pods never resolve an alias: a manifest pins the version it was rendered from, and
the server refuses to start on any other bytes (`vivace serve --expect-sha256`). Moving an
alias is followed by rendering and applying again (docs/deploy.md: follow vs pin).

This module is the one writer of those manifests; deploy/ in the repository holds them
rendered for an example release (tests/test_deploy.py checks that they match).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vivace import __version__
from vivace.errors import VivaceCLIError

PORT = 8080
MODELS_DIR = "/mnt/models"
ARTIFACTS_DIR = "/mnt/artifacts"
HOME_DIR = "/var/lib/vivace"        # the image's VIVACE_HOME, owned by its user
UID = 1000                          # the image's non-root user (Containerfile)
DEFAULT_IMAGE = f"vivace:{__version__}"
DEFAULT_STORAGE = "pvc://vivace-artifacts"
STORAGE_SCHEMES = ("s3", "gs", "pvc")
RUNTIME_NAME = "vivace"
MODEL_FORMAT = {"name": "vivace", "version": "1"}  # package.json format vivace-model-package/1
SCALE_METRIC = "vivace_queue_depth"  # requests waiting in the batcher, per model (monitor/metrics.py)
STORAGE_SECRET = "vivace-storage"    # optional: credentials for s3:// or gs:// (AWS_* / GOOGLE_*)
TARGETS = ("kserve", "k8s")
_K8S_NAME = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_K8S_NAME_MAX = 45  # KServe derives longer names (NAME-predictor-...) that must fit 63


@dataclass(frozen=True)
class Environment:
    """What differs between dev, staging and prod."""

    name: str
    namespace: str
    replicas: int            # the Deployment's and the autoscaler's minimum
    max_replicas: int
    cpu_request: str
    cpu_limit: str
    memory_request: str
    memory_limit: str
    queue_depth_target: str  # average requests waiting per pod before the autoscaler adds one
    log_level: str


ENVIRONMENTS = {
    "dev": Environment("dev", "vivace-dev", 1, 2, "250m", "1", "512Mi", "1Gi", "8", "DEBUG"),
    "staging": Environment("staging", "vivace-staging", 2, 4, "500m", "2", "1Gi", "2Gi", "8", "INFO"),
    "prod": Environment("prod", "vivace-prod", 3, 12, "1", "2", "2Gi", "4Gi", "4", "INFO"),
}
# What the kustomize base carries before an overlay sets the environment.
_BASE_ENV = Environment("base", "default", 1, 2, "250m", "1", "512Mi", "1Gi", "8", "INFO")


@dataclass(frozen=True)
class Release:
    """One registered model version, as a cluster sees it: immutable."""

    ref: str             # what it was rendered from, e.g. churn@production
    name: str            # the registry's model name (served under it)
    version: int
    package_sha256: str  # the package id: SHA-256 of its package.json
    storage_uri: str     # where the package directory lives: s3://, gs:// or pvc://
    k8s_name: str        # object names: the model name made a DNS label

    @property
    def fetch_source(self) -> str:
        """The URI the k8s init container reads: a pvc:// claim is mounted at ARTIFACTS_DIR."""
        if self.storage_uri.startswith("pvc://"):
            return ARTIFACTS_DIR + "/" + self.storage_uri[len("pvc://"):].partition("/")[2]
        return self.storage_uri

    @property
    def claim(self) -> str | None:
        return self.storage_uri[len("pvc://"):].partition("/")[0] if self.storage_uri.startswith("pvc://") else None


# A release the repository's deploy/ folder is rendered for: the demo's model at version
# 1, with a placeholder package id (the digest of the text below, not of a real package).
_EXAMPLE_SHA256 = hashlib.sha256(b"example: replace with `vivace deploy render`").hexdigest()
EXAMPLE = Release(ref="churn@production", name="churn", version=1, package_sha256=_EXAMPLE_SHA256,
                  storage_uri=f"s3://vivace-artifacts/packages/{_EXAMPLE_SHA256}", k8s_name="churn")


def k8s_name(model: str) -> str:
    """A registry model name as a Kubernetes object name (a DNS-1035 label)."""
    name = re.sub(r"[^a-z0-9-]+", "-", model.lower()).strip("-")
    if not _K8S_NAME.match(name) or len(name) > _K8S_NAME_MAX:
        raise VivaceCLIError(f"model name {model!r} does not make a Kubernetes name (a letter, then letters, digits "
                             f"and '-', at most {_K8S_NAME_MAX}): pass --name")
    return name


def check_storage(prefix: str) -> str:
    scheme, sep, rest = prefix.partition("://")
    if not sep or scheme not in STORAGE_SCHEMES or not rest.strip("/"):
        raise VivaceCLIError(f"storage URI {prefix!r}: a cluster reads packages from "
                             f"{', '.join(s + '://' for s in STORAGE_SCHEMES)} (bucket or claim, then a path)")
    if scheme == "pvc" and not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", rest.partition("/")[0]):
        raise VivaceCLIError(f"storage URI {prefix!r}: {rest.partition('/')[0]!r} is not a PersistentVolumeClaim name")
    return prefix.rstrip("/")


def resolve_release(home: str | os.PathLike, ref: str, storage: str = DEFAULT_STORAGE,
                    name: str | None = None) -> Release:
    """The immutable release `ref` names now, its bytes verified in the home.

    The package is expected at STORAGE/packages/<package id> — the home's packages/
    folder, copied to that bucket or claim."""
    from vivace.registry.models import get_version, package_path
    from vivace.registry.store import DB_NAME, open_home

    storage = check_storage(storage)
    if not (Path(home) / DB_NAME).is_file():
        raise VivaceCLIError(f"no Vivace registry at {home} ({DB_NAME} is missing): pass --home or set VIVACE_HOME")
    registry = open_home(home)
    try:
        version = get_version(registry, ref)
        package_path(registry, version.package_sha, verify=True)  # never pin bytes that are already bad
    finally:
        registry.close()
    if name is not None and (not _K8S_NAME.match(name) or len(name) > _K8S_NAME_MAX):
        raise VivaceCLIError(f"--name {name!r} is not a Kubernetes name (a letter, then lowercase letters, digits "
                             f"and '-', at most {_K8S_NAME_MAX})")
    return Release(ref=ref, name=version.name, version=version.version, package_sha256=version.package_sha,
                   storage_uri=f"{storage}/packages/{version.package_sha}", k8s_name=name or k8s_name(version.name))


# ---- the objects ---------------------------------------------------------------------


def _labels(release: Release) -> dict[str, str]:
    return {"app.kubernetes.io/name": "vivace", "app.kubernetes.io/instance": release.k8s_name,
            "app.kubernetes.io/component": "predictor"}


def _release_annotations(release: Release) -> dict[str, str]:
    return {"vivace/model-ref": release.ref, "vivace/model-version": str(release.version),
            "vivace/package-sha256": release.package_sha256, "vivace/storage-uri": release.storage_uri}


def _scrape_annotations() -> dict[str, str]:
    return {"prometheus.io/scrape": "true", "prometheus.io/port": str(PORT), "prometheus.io/path": "/metrics"}


def _resources(env: Environment) -> dict[str, Any]:
    return {"requests": {"cpu": env.cpu_request, "memory": env.memory_request},
            "limits": {"cpu": env.cpu_limit, "memory": env.memory_limit}}


def _probes() -> dict[str, Any]:
    """Ready once every model is loaded; live while the server answers. The startup probe
    gives a large model time to load before liveness counts."""
    return {
        "startupProbe": {"httpGet": {"path": "/v2/health/live", "port": PORT},
                         "periodSeconds": 2, "failureThreshold": 90},
        "readinessProbe": {"httpGet": {"path": "/v2/health/ready", "port": PORT},
                           "periodSeconds": 5, "timeoutSeconds": 2, "failureThreshold": 3},
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": PORT},
                          "periodSeconds": 10, "timeoutSeconds": 2, "failureThreshold": 3},
    }


def _container_security() -> dict[str, Any]:
    return {"runAsNonRoot": True, "runAsUser": UID, "allowPrivilegeEscalation": False,
            "privileged": False, "capabilities": {"drop": ["ALL"]}}


def _serve_args() -> list[str]:
    return ["serve", MODELS_DIR, "--host", "0.0.0.0", "--port", str(PORT)]


def serving_runtime(image: str, namespace: str) -> dict[str, Any]:
    """KServe ServingRuntime, shaped like KServe's kserve-tritonserver runtime."""
    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ServingRuntime",
        "metadata": {"name": RUNTIME_NAME, "namespace": namespace,
                     "annotations": {"serving.kserve.io/server-type": "vivace"}},
        "spec": {
            "annotations": {"prometheus.kserve.io/port": str(PORT), "prometheus.kserve.io/path": "/metrics",
                            **_scrape_annotations()},
            "supportedModelFormats": [{**MODEL_FORMAT, "autoSelect": True, "priority": 1}],
            "protocolVersions": ["v2"],
            "containers": [{
                "name": "kserve-container",
                "image": image,
                "args": _serve_args(),
                "ports": [{"containerPort": PORT, "name": "http1", "protocol": "TCP"}],
                **{k: v for k, v in _probes().items() if k != "startupProbe"},
                "securityContext": _container_security(),
                "resources": _resources(_BASE_ENV),
            }],
        },
    }


def inference_service(release: Release, env: Environment) -> dict[str, Any]:
    """KServe InferenceService serving the release on the `vivace` runtime (raw Deployment
    mode: a Deployment and an HPA, no Knative)."""
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": release.k8s_name, "namespace": env.namespace, "labels": _labels(release),
            "annotations": {"serving.kserve.io/deploymentMode": "RawDeployment",
                            "serving.kserve.io/enable-prometheus-scraping": "true", **_release_annotations(release)},
        },
        "spec": {"predictor": {
            "minReplicas": env.replicas,
            "maxReplicas": env.max_replicas,
            "scaleMetric": "cpu",
            "scaleTarget": 70,
            "model": {
                "modelFormat": dict(MODEL_FORMAT),
                "runtime": RUNTIME_NAME,
                "protocolVersion": "v2",
                "storageUri": release.storage_uri,
                # KServe appends these to the runtime's `serve /mnt/models ...`.
                "args": ["--model-name", release.name, "--model-version", str(release.version),
                         "--expect-sha256", release.package_sha256],
                "env": [{"name": "VIVACE_LOG_LEVEL", "value": env.log_level}],
                "resources": _resources(env),
            },
        }},
    }


def kserve_objects(release: Release, env: Environment, image: str) -> list[dict[str, Any]]:
    return [serving_runtime(image, env.namespace), inference_service(release, env)]


def _model_env(release: Release | None, env: Environment) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(serving container env, init container env); the base's placeholders are empty."""
    name, version, sha, uri = ((release.name, str(release.version), release.package_sha256, release.fetch_source)
                               if release else ("", "", "", ""))
    serve = [{"name": "VIVACE_MODEL_NAME", "value": name}, {"name": "VIVACE_MODEL_VERSION", "value": version},
             {"name": "VIVACE_PACKAGE_SHA256", "value": sha}, {"name": "VIVACE_LOG_LEVEL", "value": env.log_level}]
    fetch = [{"name": "VIVACE_MODEL_URI", "value": uri}, {"name": "VIVACE_PACKAGE_SHA256", "value": sha}]
    return serve, fetch


def deployment(release: Release, env: Environment, image: str, placeholders: bool = False) -> dict[str, Any]:
    """The Deployment: an init container fetches and verifies the package into /mnt/models,
    then `vivace serve` serves it pinned to the release."""
    labels = _labels(release)
    serve_env, fetch_env = _model_env(None if placeholders else release, env)
    annotations = _scrape_annotations() if placeholders else {**_scrape_annotations(), **_release_annotations(release)}
    volumes: list[dict[str, Any]] = [{"name": "models", "emptyDir": {}}, {"name": "home", "emptyDir": {}}]
    fetch_mounts: list[dict[str, Any]] = [{"name": "models", "mountPath": MODELS_DIR}]
    if release.claim and not placeholders:
        # First, where kustomize puts what an overlay's patch adds to a list.
        volumes.insert(0, {"name": "artifacts", "persistentVolumeClaim": {"claimName": release.claim, "readOnly": True}})
        fetch_mounts.insert(0, {"name": "artifacts", "mountPath": ARTIFACTS_DIR, "readOnly": True})
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": release.k8s_name, "labels": labels},
        "spec": {
            "replicas": env.replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": labels},
            # A new pod must be ready before an old one goes: capacity never drops in a rollout.
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels, "annotations": annotations},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": UID, "runAsGroup": UID, "fsGroup": UID,
                                        "seccompProfile": {"type": "RuntimeDefault"}},
                    # The preStop pause plus `vivace serve --drain-timeout` (30 s), with room to spare.
                    "terminationGracePeriodSeconds": 45,
                    "initContainers": [{
                        "name": "fetch-model",
                        "image": image,
                        "args": ["deploy", "fetch", "$(VIVACE_MODEL_URI)", MODELS_DIR,
                                 "--sha256", "$(VIVACE_PACKAGE_SHA256)"],
                        "env": fetch_env,
                        "envFrom": [{"secretRef": {"name": STORAGE_SECRET, "optional": True}}],
                        "volumeMounts": fetch_mounts,
                        "securityContext": _container_security(),
                        "resources": {"requests": {"cpu": "100m", "memory": "256Mi"},
                                      "limits": {"cpu": "1", "memory": "512Mi"}},
                    }],
                    "containers": [{
                        "name": "vivace",
                        "image": image,
                        "args": [*_serve_args(), "--model-name", "$(VIVACE_MODEL_NAME)",
                                 "--model-version", "$(VIVACE_MODEL_VERSION)",
                                 "--expect-sha256", "$(VIVACE_PACKAGE_SHA256)"],
                        "env": serve_env,
                        "ports": [{"name": "http", "containerPort": PORT, "protocol": "TCP"}],
                        **_probes(),
                        # SIGTERM makes the server refuse new connections; wait until the
                        # endpoint is gone from the Service before sending it.
                        "lifecycle": {"preStop": {"exec": {"command": ["sleep", "5"]}}},
                        "resources": _resources(env),
                        "securityContext": _container_security(),
                        "volumeMounts": [{"name": "models", "mountPath": MODELS_DIR, "readOnly": True},
                                         {"name": "home", "mountPath": HOME_DIR}],
                    }],
                    "volumes": volumes,
                },
            },
        },
    }


def service(release: Release) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": release.k8s_name, "labels": _labels(release)},
        "spec": {"selector": _labels(release),
                 "ports": [{"name": "http", "port": PORT, "targetPort": "http", "protocol": "TCP"}]},
    }


def _hpa_metrics(env: Environment) -> list[dict[str, Any]]:
    """Scale on queued requests per pod (through prometheus-adapter: deploy/k8s/
    prometheus-adapter-rules.yaml), and on CPU should that metric be missing."""
    return [
        {"type": "Pods", "pods": {"metric": {"name": SCALE_METRIC},
                                  "target": {"type": "AverageValue", "averageValue": env.queue_depth_target}}},
        {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 70}}},
    ]


def autoscaler(release: Release, env: Environment) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": release.k8s_name, "labels": _labels(release)},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": release.k8s_name},
            "minReplicas": env.replicas,
            "maxReplicas": env.max_replicas,
            "metrics": _hpa_metrics(env),
            # Scale up at once; scale down slowly, so a burst does not flap the pod count.
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 300}},
        },
    }


def disruption_budget(release: Release) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": release.k8s_name, "labels": _labels(release)},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": _labels(release)}},
    }


def service_monitor(release: Release) -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "ServiceMonitor",
        "metadata": {"name": release.k8s_name, "labels": _labels(release)},
        "spec": {"selector": {"matchLabels": _labels(release)},
                 "endpoints": [{"port": "http", "path": "/metrics", "interval": "15s"}]},
    }


def _namespaced(objects: list[dict[str, Any]], namespace: str) -> list[dict[str, Any]]:
    for obj in objects:
        obj["metadata"] = {"name": obj["metadata"]["name"], "namespace": namespace,
                           **{k: v for k, v in obj["metadata"].items() if k != "name"}}
    return objects


def k8s_objects(release: Release, env: Environment, image: str) -> list[dict[str, Any]]:
    """The objects `kubectl kustomize overlays/ENV` renders from the tree of `k8s_tree`."""
    return _namespaced([service(release), deployment(release, env, image), autoscaler(release, env),
                        disruption_budget(release), service_monitor(release)], env.namespace)


def _image_entry(image: str) -> dict[str, str]:
    """kustomize's `images:` entry replacing the base's image with `image`."""
    name, at, digest = image.partition("@")
    if at:
        return {"name": "vivace", "newName": name, "digest": digest}
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return {"name": "vivace", "newName": name[:colon], "newTag": name[colon + 1:]}
    return {"name": "vivace", "newName": name}


def k8s_tree(release: Release, env: Environment, image: str) -> dict[str, list[dict[str, Any]]]:
    """A kustomize base for the model and the overlay for `env`: path -> YAML documents."""
    base = [service(release), deployment(release, _BASE_ENV, "vivace", placeholders=True),
            autoscaler(release, _BASE_ENV), disruption_budget(release), service_monitor(release)]
    short = {"HorizontalPodAutoscaler": "hpa", "PodDisruptionBudget": "pdb"}
    files = {f"base/{short.get(obj['kind'], obj['kind'].lower())}.yaml": [obj] for obj in base}
    files["base/kustomization.yaml"] = [{
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [path.removeprefix("base/") for path in files],
    }]
    full = deployment(release, env, image)
    pod = full["spec"]["template"]["spec"]
    init, main = pod["initContainers"][0], pod["containers"][0]
    pod_patch: dict[str, Any] = {
        "initContainers": [{"name": init["name"], "env": init["env"]}],
        "containers": [{"name": main["name"], "env": main["env"], "resources": main["resources"]}],
    }
    if release.claim:
        pod_patch["initContainers"][0]["volumeMounts"] = init["volumeMounts"][:1]
        pod_patch["volumes"] = pod["volumes"][:1]
    overlay = f"overlays/{env.name}"
    files[f"{overlay}/deployment-patch.yaml"] = [{
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": release.k8s_name},
        "spec": {"replicas": env.replicas, "template": {
            "metadata": {"annotations": _release_annotations(release)}, "spec": pod_patch}},
    }]
    hpa = autoscaler(release, env)
    files[f"{overlay}/hpa-patch.yaml"] = [{
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": release.k8s_name},
        "spec": {k: hpa["spec"][k] for k in ("minReplicas", "maxReplicas", "metrics")},
    }]
    files[f"{overlay}/kustomization.yaml"] = [{
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "namespace": env.namespace,
        "resources": ["../../base"],
        "images": [_image_entry(image)],
        "patches": [{"path": "deployment-patch.yaml"}, {"path": "hpa-patch.yaml"}],
    }]
    return files


def kserve_tree(release: Release, env: Environment, image: str) -> dict[str, list[dict[str, Any]]]:
    runtime, isvc = kserve_objects(release, env, image)
    return {f"{env.name}/servingruntime.yaml": [runtime], f"{env.name}/inferenceservice.yaml": [isvc]}


def to_yaml(documents: list[dict[str, Any]]) -> str:
    import yaml

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:
            return True  # shared label maps are written out, never as &anchors

    return yaml.dump_all(documents, Dumper=Dumper, sort_keys=False, default_flow_style=False, width=1000)


def render(release: Release, target: str, env: Environment, image: str) -> tuple[list[dict[str, Any]],
                                                                                dict[str, list[dict[str, Any]]]]:
    """(the objects to apply, the files that describe them)."""
    if target == "kserve":
        return kserve_objects(release, env, image), kserve_tree(release, env, image)
    return k8s_objects(release, env, image), k8s_tree(release, env, image)


# ---- writing -------------------------------------------------------------------------


def write_tree(out: Path, files: dict[str, str]) -> list[Path]:
    """Write `files` (relative path -> text) under `out`, all or nothing.

    A new `out` is built beside it and renamed into place. Into an existing one, every
    file is first written to a temporary name next to its target, and only when all are
    written are they renamed over the targets — an error before that leaves `out` as it was.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise VivaceCLIError(f"--out {out}: exists and is not a directory")
    parent = out.absolute().parent
    if not out.exists():
        if not parent.is_dir():
            raise VivaceCLIError(f"--out {out}: its parent {parent} is not a directory")
        try:
            staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
        except OSError as exc:
            raise VivaceCLIError(f"--out {out}: cannot write in {parent}: {exc.strerror}") from None
        try:
            for rel, text in files.items():
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                (staging / rel).write_text(text, encoding="utf-8")
            os.chmod(staging, 0o755)  # mkdtemp made it private
            os.rename(staging, out)
        except OSError as exc:
            raise VivaceCLIError(f"--out {out}: {exc.strerror or exc}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return [out / rel for rel in files]
    staged: list[tuple[Path, Path]] = []
    made: list[Path] = []
    try:
        for rel, text in files.items():
            target = out / rel
            missing = [p for p in [target.parent, *target.parent.parents] if not p.exists()]
            for folder in reversed(missing):
                folder.mkdir()
                made.append(folder)
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
            staged.append((Path(tmp_name), target))
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
    except OSError as exc:
        for written, _ in staged:
            written.unlink(missing_ok=True)
        for folder in reversed(made):
            shutil.rmtree(folder, ignore_errors=True)
        raise VivaceCLIError(f"--out {out}: {exc.strerror or exc}") from None
    for written, target in staged:
        os.chmod(written, 0o644)
        os.replace(written, target)
    return [target for _, target in staged]


def write_examples(folder: str | os.PathLike) -> None:
    """Regenerate the repository's deploy/kserve and deploy/k8s for the EXAMPLE release."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for target in TARGETS:
        files: dict[str, str] = {}
        for env in ENVIRONMENTS.values():
            files.update({path: to_yaml(docs) for path, docs in render(EXAMPLE, target, env, DEFAULT_IMAGE)[1].items()})
        write_tree(folder / target, files)


# ---- commands ------------------------------------------------------------------------


def register(subparsers) -> None:
    deploy = subparsers.add_parser("deploy", help="Kubernetes and KServe manifests for a registered model",
                                   description="Render deployment manifests from the registry, and fetch a "
                                   "package into a pod (what the rendered init container runs).")
    sub = deploy.add_subparsers(dest="deploy_command", metavar="ACTION", required=True)
    render_cmd = sub.add_parser(
        "render", help="write the manifests serving NAME@ALIAS (pinned to the version it names now)",
        description="Resolve NAME@ALIAS (or NAME/VERSION) to its version and package, and write the manifests "
        "that serve exactly that package: to stdout as YAML documents, or with --out as files "
        "(k8s: a kustomize base and overlays/ENV; kserve: ENV/servingruntime.yaml and ENV/inferenceservice.yaml).")
    render_cmd.add_argument("ref", metavar="NAME@ALIAS", help="model reference: NAME@ALIAS, NAME/VERSION or NAME")
    render_cmd.add_argument("--target", required=True, help=f"one of: {', '.join(TARGETS)}")
    render_cmd.add_argument("--env", required=True, help=f"one of: {', '.join(ENVIRONMENTS)}")
    render_cmd.add_argument("--out", default=None, metavar="DIR", help="write files under DIR instead of stdout")
    render_cmd.add_argument("--storage-uri", default=os.environ.get("VIVACE_STORAGE_URI", DEFAULT_STORAGE),
                            metavar="PREFIX", help="where the home's packages/ folder is copied for the cluster: "
                            "s3://BUCKET/PATH, gs://BUCKET/PATH or pvc://CLAIM/PATH (default: $VIVACE_STORAGE_URI "
                            f"or {DEFAULT_STORAGE})")
    render_cmd.add_argument("--image", default=DEFAULT_IMAGE, help=f"container image (default: {DEFAULT_IMAGE}, "
                            "what `docker build -f Containerfile -t vivace:VERSION .` makes)")
    render_cmd.add_argument("--namespace", default=None, help="namespace (default: vivace-ENV)")
    render_cmd.add_argument("--name", default=None, help="object name (default: the model name as a DNS label)")
    render_cmd.set_defaults(func=_render)
    fetch = sub.add_parser(
        "fetch", help="copy a package from shared storage into a directory, verified",
        description="Copy the package at URI (s3://, gs://, file:// or a path) into DEST, refusing it unless its "
        "package.json hashes to --sha256 and every file to its recorded digest. DEST receives the whole package "
        "or no package.json at all.")
    fetch.add_argument("uri", metavar="URI")
    fetch.add_argument("dest", metavar="DEST")
    fetch.add_argument("--sha256", required=True, help="the package id (SHA-256 of its package.json)")
    fetch.add_argument("--cache", default=None, metavar="DIR",
                       help="a local content-addressed cache: download there once (verified), copy from it after")
    fetch.set_defaults(func=_fetch)
    publish = sub.add_parser(
        "publish", help="upload the package NAME@ALIAS names to shared storage, where render expects it",
        description="Upload the registry's package for NAME@ALIAS (or NAME/VERSION) to PREFIX/packages/<package id> "
        "(s3://, gs://, file:// or a path on a shared mount). Files go first and package.json last, so an "
        "interrupted upload is never fetched; a complete one is not uploaded again.")
    publish.add_argument("ref", metavar="NAME@ALIAS")
    publish.add_argument("--storage-uri", default=os.environ.get("VIVACE_STORAGE_URI"), metavar="PREFIX",
                         help="s3://BUCKET/PATH, gs://BUCKET/PATH, file:///PATH or a path (default: $VIVACE_STORAGE_URI)")
    publish.set_defaults(func=_publish)


def _render(args: argparse.Namespace) -> int:
    if args.target not in TARGETS:
        raise VivaceCLIError(f"unknown target {args.target!r} (known: {', '.join(TARGETS)})")
    if args.env not in ENVIRONMENTS:
        raise VivaceCLIError(f"unknown environment {args.env!r} (known: {', '.join(ENVIRONMENTS)})")
    env = ENVIRONMENTS[args.env]
    if args.namespace:
        if not _K8S_NAME.match(args.namespace):
            raise VivaceCLIError(f"--namespace {args.namespace!r} is not a Kubernetes name")
        env = Environment(**{**env.__dict__, "namespace": args.namespace})
    release = resolve_release(args.home, args.ref, args.storage_uri, args.name)
    objects, files = render(release, args.target, env, args.image)
    if args.out is None:
        sys.stdout.write(to_yaml(objects))
    else:
        written = write_tree(Path(args.out), {path: to_yaml(docs) for path, docs in files.items()})
        apply = (f"kubectl apply -k {Path(args.out) / 'overlays' / env.name}" if args.target == "k8s"
                 else f"kubectl apply -f {Path(args.out) / env.name}")
        print(f"wrote {len(written)} files under {args.out}; apply with: {apply}", file=sys.stderr)
    print(f"{args.ref} -> {release.name}/{release.version}, package sha256 {release.package_sha256}, "
          f"expected at {release.storage_uri} (a copy of {Path(args.home) / 'packages' / release.package_sha256})",
          file=sys.stderr)
    return 0


def _fetch(args: argparse.Namespace) -> int:
    from vivace.registry.remote import fetch_package

    path = fetch_package(args.uri, args.dest, args.sha256, cache=args.cache)
    print(f"fetched {args.uri} -> {path} (package sha256 {args.sha256})", file=sys.stderr)
    return 0


def _publish(args: argparse.Namespace) -> int:
    from vivace.registry.models import get_version
    from vivace.registry.remote import publish_package
    from vivace.registry.store import DB_NAME, open_home

    prefix = args.storage_uri
    if not prefix:
        raise VivaceCLIError("no --storage-uri (or VIVACE_STORAGE_URI): where should the package go?")
    if prefix.startswith("pvc://"):
        raise VivaceCLIError(f"{prefix}: a claim is written from inside the cluster; publish to the path where it "
                             "is mounted, or copy the home's packages/<package id>/ folder onto it")
    if not (Path(args.home) / DB_NAME).is_file():
        raise VivaceCLIError(f"no Vivace registry at {args.home} ({DB_NAME} is missing): pass --home or set VIVACE_HOME")
    with open_home(args.home) as registry:
        version = get_version(registry, args.ref)
        uri = publish_package(registry, version.package_sha, prefix)
    print(f"{args.ref} -> {version.name}/{version.version}, package sha256 {version.package_sha}, published to {uri}",
          file=sys.stderr)
    print(uri)
    return 0
