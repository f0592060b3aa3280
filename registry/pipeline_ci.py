"""`vivace pipeline ci --github|--gitlab`: a CI configuration mirroring a pipeline.

One CI job per step, in the pipeline's run order, each after the one before. A job runs
``vivace pipeline run FILE --until STEP``: it starts from the Vivace home the previous job
left (an artifact: ``.vivace/`` and the files the steps wrote), so what already ran is
cached and only STEP runs. `promote` steps are the deployment gate: a manual job on GitLab
(``when: manual``, blocking what follows), a job in a protected `environment` on GitHub
(its required reviewers approve; it runs for the default branch or a manual
``workflow_dispatch``).
"""
from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from .pipeline import FeaturesHistorical, Package, Pipeline, Quantize, Shell

HOME = ".vivace"
# Top-level keys of .gitlab-ci.yml that a job may not be named.
_GITLAB_RESERVED = {"image", "services", "stages", "types", "before_script", "after_script", "variables", "cache",
                    "include", "workflow", "default", "pages", "spec"}


def _artifacts(pipeline: Pipeline, root: Path) -> list[str]:
    """Files and folders the steps write that a later job needs (paths relative to `root`)."""
    paths = [f"{HOME}/"]
    for step in pipeline.steps.values():
        doc = step.doc
        written = list(doc.outputs.values()) if isinstance(doc, Shell) else (
            [doc.out] if isinstance(doc, (Package, Quantize, FeaturesHistorical)) else [])
        for value in written:
            if value.startswith("<steps."):
                continue
            path = (pipeline.workdir / value).absolute()
            try:
                rel = path.relative_to(root)
            except ValueError:
                continue  # outside the checkout (e.g. under the home): the home artifact holds it
            if rel.parts and rel.parts[0] == HOME:
                continue
            paths.append(rel.as_posix())
    return list(dict.fromkeys(paths))


def _command(source: str, pipeline: Pipeline, step: str) -> str:
    overrides = " ".join(f"-p {shlex.quote(o)}" for o in pipeline.overrides)
    return f"vivace pipeline run {source} --until {step}" + (f" {overrides}" if overrides else "")


def _gated(pipeline: Pipeline) -> set[str]:
    return {name for name, step in pipeline.steps.items() if step.type == "promote"}


def gitlab(pipeline: Pipeline, source: str, root: Path, install: str, image: str, environment: str) -> dict[str, Any]:
    jobs: dict[str, Any] = {}
    names = {n: (n if n not in _GITLAB_RESERVED else f"{n}-step") for n in pipeline.steps}
    config: dict[str, Any] = {
        "stages": list(pipeline.steps),
        "variables": {"VIVACE_HOME": HOME},
        "default": {"image": image, "before_script": [install]},
    }
    artifacts = _artifacts(pipeline, root)
    previous: str | None = None
    for name in pipeline.steps:
        job: dict[str, Any] = {"stage": name}
        if previous is not None:  # its artifacts only: the home as the previous job left it
            job["needs"] = [names[previous]]
        job.update({"script": [_command(source, pipeline, name)],
                    "artifacts": {"paths": list(artifacts), "expire_in": "1 week", "when": "always"}})
        previous = name
        if name in _gated(pipeline):
            job.update({"when": "manual", "allow_failure": False,
                        "environment": {"name": environment, "action": "start"}})
        jobs[names[name]] = job
    config.update(jobs)
    return config


def github(pipeline: Pipeline, source: str, root: Path, install: str, python: str, environment: str,
           branch: str) -> dict[str, Any]:
    artifacts = _artifacts(pipeline, root)
    # upload-artifact roots an artifact at its paths' common folder: with the home alone, that
    # is the home itself, so it is downloaded into the home.
    paths = [*artifacts, *([source] if not source.startswith("--") else [])]
    download = "." if len(paths) > 1 else HOME
    jobs: dict[str, Any] = {}
    previous: str | None = None
    for name in pipeline.steps:
        steps: list[dict[str, Any]] = [
            {"uses": "actions/checkout@v4"},
            {"uses": "actions/setup-python@v5", "with": {"python-version": python}},
            {"name": "Install Vivace", "run": install},
        ]
        if previous is not None:
            steps.append({"name": f"Vivace home after {previous}", "uses": "actions/download-artifact@v4",
                          "with": {"name": f"vivace-{previous}", "path": download}})
        steps.append({"name": f"Step {name}", "run": _command(source, pipeline, name)})
        steps.append({"name": "Keep the Vivace home for the next job", "if": "always()",
                      "uses": "actions/upload-artifact@v4",
                      "with": {"name": f"vivace-{name}", "path": "\n".join(paths), "include-hidden-files": True,
                               "retention-days": 7, "if-no-files-found": "ignore"}})
        job: dict[str, Any] = {"runs-on": "ubuntu-latest"}
        if previous is not None:
            job["needs"] = [previous]
        if name in _gated(pipeline):
            job["if"] = f"github.event_name == 'workflow_dispatch' || github.ref == 'refs/heads/{branch}'"
            job["environment"] = {"name": environment}
        job["steps"] = steps
        jobs[name] = job
        previous = name
    return {
        "name": f"vivace pipeline {pipeline.name}",
        "on": {"push": {"branches": [branch]}, "pull_request": {}, "workflow_dispatch": {}},
        "env": {"VIVACE_HOME": HOME},
        "jobs": jobs,
    }


def render(pipeline: Pipeline, system: str, source: str, root: Path | None = None, install: str = "pip install vivace",
           python: str = "3.11", environment: str = "production", branch: str = "main") -> str:
    """The CI file's text, with a header saying where it came from."""
    import yaml

    root = (root or Path.cwd()).absolute()
    if system == "github":
        config = github(pipeline, source, root, install, python, environment, branch)
        where = ".github/workflows/vivace-pipeline.yml"
        gate = (f"The promote job runs in the `{environment}` environment: add required reviewers to it\n"
                f"# (Settings > Environments) so that a person approves each deployment.")
    else:
        config = gitlab(pipeline, source, root, install, f"python:{python}", environment)
        where = ".gitlab-ci.yml"
        gate = "The promote job is manual (when: manual): a person starts the deployment."
    header = (f"# Written by `vivace pipeline ci --{system} {source}`: pipeline {pipeline.name!r}, one job per\n"
              f"# step in run order. Each job resumes from the Vivace home the previous one left (an\n"
              f"# artifact), so only its own step runs. Commit it as {where}.\n# {gate}\n")
    return header + yaml.safe_dump(config, sort_keys=False, width=120)
