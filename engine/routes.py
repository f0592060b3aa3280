"""Every HTTP route the server answers, declared once.

`App.dispatch` (engine/server.py) matches requests against `ROUTES`, the auth check reads
each route's scope from it, and the OpenAPI document (engine/openapi.py) describes the same
entries: a route added here is served, guarded and documented, and nothing else needs to
know about it. (The native front end's fast path covers only plain JSON infer requests; it
forwards everything else, including errors, to `App.dispatch`.)

A model route is declared once under `/v2/models/{model_name}`; its
`/v2/models/{model_name}/versions/{model_version}` twin is derived (`versioned`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

MODEL_PREFIX = "/v2/models/{model_name}"
VERSION_SEGMENT = "/versions/{model_version}"


@dataclass(frozen=True)
class Route:
    method: str                 # the one method the route serves; others get 405 + Allow
    path: str                   # OpenAPI path template
    handler: str                # the App method that answers it
    scope: str | None           # bearer-token scope needed with --auth; None: always open
    operation_id: str
    summary: str
    response: str | dict[str, Any] | None = None  # 200 body: a components/schemas name or a schema
    model: bool = False         # under MODEL_PREFIX: has a versioned twin, answers 404 for unknown models
    not_ready: bool = False     # may answer 503 with a Ready body
    request: str | None = None  # optional JSON body: a components/schemas name
    errors: tuple[str, ...] = ()  # further statuses the route answers (repository routes)
    admin: bool = False         # model control: needs --repository-control

    @property
    def segments(self) -> tuple[str, ...]:
        return tuple(p for p in self.path.split("/") if p)

    def versioned(self) -> Route:
        """The same route for an explicit model version."""
        assert self.model, self.path
        tail = self.path[len(MODEL_PREFIX):]
        return replace(self, path=MODEL_PREFIX + VERSION_SEGMENT + tail, operation_id=self.operation_id + "_version")


def _model(tail: str, method: str, handler: str, scope: str, operation_id: str, summary: str,
           response: str | None = None, **kw: Any) -> Route:
    return Route(method, MODEL_PREFIX + tail, handler, scope, operation_id, summary, response, model=True, **kw)


ROUTES: tuple[Route, ...] = (
    Route("GET", "/v2/health/live", "_live", None, "health_live", "The server is live.", "Live"),
    Route("GET", "/v2/health/ready", "_ready", None, "health_ready",
          "The server and all its models are ready (503 while draining).", "Ready", not_ready=True),
    Route("GET", "/v2", "_server_metadata", "read", "server_metadata", "Server name, version and extensions.",
          "ServerMetadata"),
    Route("GET", "/v2/models/stats", "_stats", "read", "stats_all", "Statistics of every served model version.",
          "Statistics"),
    Route("GET", "/metrics", "_metrics", "read", "metrics", "Prometheus metrics (text exposition format)."),
    Route("GET", "/v2/openapi.json", "_openapi", "read", "openapi", "This document.",
          {"type": "object", "required": ["openapi", "paths"]}),
    _model("", "GET", "_model_metadata", "read", "model_metadata", "Model metadata: signature and versions.",
           "ModelMetadata"),
    _model("/ready", "GET", "_model_ready", "read", "model_ready",
           "Whether the model accepts requests (503 when not).", "Ready", not_ready=True),
    _model("/config", "GET", "_model_config", "read", "model_config",
           "The model configuration as Triton returns it.", "ModelConfig"),
    _model("/stats", "GET", "_stats", "read", "model_stats",
           "Statistics of the model (Triton statistics extension).", "Statistics"),
    _model("/drift", "GET", "_drift", "read", "model_drift",
           "Drift statistics against the reference profile (404 without one).", "DriftStatus"),
    _model("/rollout", "GET", "_rollout", "read", "model_rollout",
           "The rollout being served on the model: canary weight, requests per version, shadow "
           "comparison (ref null: no rollout).", "RolloutStatus"),
    _model("/feedback", "POST", "_feedback", "infer", "model_feedback",
           "Ground truth: labels for logged request ids (or entity ids), joined to the prediction log; "
           "unknown ids are counted, not refused (404 without --prediction-log).", "FeedbackAccepted",
           request="FeedbackRequest", errors=("404", "503")),
    _model("/performance", "GET", "_performance", "read", "model_performance",
           "Quality over the label window (accuracy, AUC, log-loss, calibration; MAE, RMSE), group metrics of "
           "sensitive attributes, feature importance in production and at training.", "Performance"),
    _model("/infer", "POST", "_infer", "infer", "infer",
           "Run inference (JSON, or Triton's binary tensor extension)."),
    Route("POST", "/v2/repository/index", "_repository_index", "read", "repository_index",
          "The served model versions and their state.",
          {"type": "array", "items": {"$ref": "#/components/schemas/RepositoryModel"}}),
    Route("POST", "/v2/repository/models/{model_name}/load", "_load", "admin", "repository_load",
          "Serve a model from the registry (parameters.ref: NAME@ALIAS or NAME/VERSION, default "
          "NAME@latest); a served model is switched without failing requests.", "Loaded",
          request="LoadRequest", errors=("404", "503"), admin=True),
    Route("POST", "/v2/repository/models/{model_name}/unload", "_unload", "admin", "repository_unload",
          "Stop serving a model; its queued requests finish first.", "Unloaded", errors=("404",), admin=True),
    Route("POST", "/v2/repository/models/{model_name}/alias", "_move_alias", "admin", "repository_alias",
          "Point NAME@ALIAS at a version in the registry; servers following the alias switch to it.",
          "AliasMoved", request="AliasRequest", errors=("404", "503"), admin=True),
    Route("POST", "/v2/repository/models/{model_name}/rollout", "_rollout_action", "admin", "repository_rollout",
          "Start, step, promote or abort a rollout on NAME@ALIAS in the registry; servers following the "
          "alias apply it.", "RolloutChanged", request="RolloutRequest", errors=("404", "503"), admin=True),
    Route("POST", "/v2/repository/models/{model_name}/request", "_request_promotion", "admin",
          "repository_request", "Ask for a promotion to a protected alias; the token's name is the requester.",
          "PromotionRequested", request="PromotionRequestBody", errors=("404", "503"), admin=True),
    Route("POST", "/v2/repository/models/{model_name}/approve", "_approve_promotion", "approve",
          "repository_approve", "Approve (or reject) a promotion request made by another token; approval runs "
          "the promotion gate and moves the alias.", "PromotionDecided", request="ApprovalBody",
          errors=("404", "503"), admin=True),
)

# Routes that never need a token (health checks), as request paths.
OPEN_PATHS = frozenset(r.path.encode() for r in ROUTES if r.scope is None)


def _expand(routes: tuple[Route, ...]) -> tuple[Route, ...]:
    return tuple(x for r in routes for x in ((r, r.versioned()) if r.model else (r,)))


# Path templates in match order: literal segments before parameters, so that
# /v2/models/stats is the statistics route and not model "stats".
_TEMPLATES: dict[tuple[str, ...], dict[str, Route]] = {}
for _route in sorted(_expand(ROUTES), key=lambda r: [s.startswith("{") for s in r.segments]):
    _TEMPLATES.setdefault(_route.segments, {})[_route.method] = _route


def match(path: str) -> tuple[dict[str, Route], dict[str, str]] | None:
    """The routes (by method) of a request path and its path parameters; None: no route."""
    parts = [p for p in path.split("/") if p]
    for template, by_method in _TEMPLATES.items():
        if len(template) != len(parts):
            continue
        params: dict[str, str] = {}
        for want, got in zip(template, parts):
            if want.startswith("{"):
                params[want[1:-1]] = got
            elif want != got:
                break
        else:
            return by_method, params
    return None
