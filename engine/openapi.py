"""The OpenAPI 3.1 document of the HTTP API, built from what an App serves.

`document(app)` describes every route of engine/routes.py (KServe v2 / Open Inference
Protocol REST, Triton's binary tensor, configuration, statistics and model repository
extensions, drift, Prometheus metrics). It is generated per server, not written once: the
served model names and versions are the enums of the path parameters, and each model's
signature (input names, datatypes, row shapes) constrains the infer request, so that
clients and property-based testers (schemathesis) see exactly what the server accepts.

OpenAPI 3.1 because its schemas are JSON Schema 2020-12: `const` and `prefixItems` describe
a tensor shape such as [batch, 32] exactly, which 3.0 cannot.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vivace import __version__
from vivace import datatypes
from vivace.registry.package import ModelPackage, TensorSpec

from . import routes
from .model_table import version_key
from .oip import RawFeatures

if TYPE_CHECKING:
    from .server import App

OPENAPI_VERSION = "3.1.0"
SCHEMAS = "#/components/schemas/"
RESPONSES = "#/components/responses/"
# Registry names and aliases (registry/package.py and registry/data.py `_NAME_RE`).
_NAME = r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}"
MODEL_NAME_PATTERN = f"^{_NAME}$"
MODEL_REF_PATTERN = f"^{_NAME}(@{_NAME}|/[0-9]+)$"

_INT_RANGES = {d.name: d.int_range for d in datatypes.TABLE if d.int_range}
_FLOAT_LIMITS = {d.name: d.float_max for d in datatypes.TABLE if d.float_max}

# Failures any request can meet before it reaches a route: framing, limits, load, bugs.
_TRANSPORT_ERRORS = {
    "400": "BadRequest",
    "408": "RequestTimeout",
    "413": "PayloadTooLarge",
    "431": "HeadersTooLarge",
    "500": "InternalError",
    "503": "Unavailable",
}


def document(app: App) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `app`'s HTTP API (a JSON-ready dict)."""
    packages = {name: runner.package for name, runner in sorted(app.latest.items())}
    versions = {name: app.table.versions(name) for name in packages}
    all_versions = sorted({v for vs in versions.values() for v in vs}, key=version_key)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {
            "title": "Vivace inference server",
            "version": __version__,
            "description": (
                "KServe v2 / Open Inference Protocol REST API with Triton's binary tensor data, "
                "model configuration, statistics and model repository extensions. Errors are "
                '`{"error": "..."}`. A method a route does not serve is answered 405, an unknown '
                "route or model 404. Bearer tokens are optional: when the server has "
                "authentication enabled, every route except health needs a token with the "
                "scope the operation names (infer, read or admin)."
            ),
        },
        "servers": [{"url": "/"}],
        "paths": _paths(packages, versions),
        "components": {
            "parameters": _path_parameters(packages, all_versions),
            "schemas": {**_common_schemas(), **_model_schemas(packages, versions, app.config.max_body_bytes)},
            "responses": _error_responses(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "Optional; scopes infer, read (metadata, statistics, repository "
                    "index) and admin (repository load and unload, alias moves).",
                },
            },
        },
    }


# -- paths -------------------------------------------------------------------------------

def _paths(packages: dict[str, ModelPackage], versions_of: dict[str, list[str]]) -> dict[str, Any]:
    """One path item per route of engine/routes.py (infer: one per served model)."""
    paths: dict[str, Any] = {}
    for route in routes.ROUTES:
        if route.handler == "_infer":
            # Infer has one path per model: a request body cannot depend on a path parameter,
            # and each model's signature is what makes its request schema exact.
            for name, package in packages.items():
                version_param = {"name": "model_version", "in": "path", "required": True,
                                 "schema": {"type": "string", "enum": versions_of[name]}}
                paths[route.path.replace("{model_name}", name)] = {
                    "post": _infer_operation(f"{route.operation_id}.{name}", package)}
                paths[route.versioned().path.replace("{model_name}", name)] = {
                    "parameters": [version_param],
                    "post": _infer_operation(f"{route.versioned().operation_id}.{name}", package)}
            continue
        for variant in (route, route.versioned()) if route.model else (route,):
            item: dict[str, Any] = {variant.method.lower(): _operation(variant)}
            params = [p for p in ("ModelName", "ModelVersion") if "{" + _PATH_PARAMS[p] + "}" in variant.path]
            if variant.admin:
                params = ["RepositoryModelName"]
            if params:
                item = {"parameters": [{"$ref": f"#/components/parameters/{p}"} for p in params], **item}
            paths[variant.path] = item
    return paths


_PATH_PARAMS = {"ModelName": "model_name", "ModelVersion": "model_version"}


def _operation(route: routes.Route) -> dict[str, Any]:
    """The OpenAPI operation of a (non-infer) route."""
    if route.response is None:  # Prometheus text
        ok = {"description": "Metrics", "content": {"text/plain": {"schema": {"type": "string"}}}}
    else:
        body = {"$ref": SCHEMAS + route.response} if isinstance(route.response, str) else route.response
        ok = {"description": route.summary, "content": {"application/json": {"schema": body}}}
    responses: dict[str, Any] = {"200": ok}
    if route.model:
        responses["404"] = {"$ref": RESPONSES + "NotFound"}
    if route.scope is not None:  # health checks are never behind authentication
        responses.update(_auth_errors())
    responses.update(_transport_errors())
    for code in route.errors:
        responses[code] = {"$ref": RESPONSES + {"404": "NotFound", "503": "Unavailable"}[code]}
    if route.not_ready:
        responses["503"] = {"description": "Not ready", "content": {"application/json": {"schema": {
            "anyOf": [{"$ref": SCHEMAS + "Ready"}, {"$ref": SCHEMAS + "Error"}]}}}}
    operation: dict[str, Any] = {
        "operationId": route.operation_id, "summary": route.summary,
        "security": [] if route.scope is None else [{}, {"bearer": [route.scope]}],
    }
    if route.request is not None:
        operation["requestBody"] = {"required": False, "content": {"application/json": {"schema": {
            "$ref": SCHEMAS + route.request}}}}
    operation["responses"] = responses
    return operation


def _infer_operation(op_id: str, package: ModelPackage) -> dict[str, Any]:
    return {
        "operationId": op_id,
        "summary": f"Run inference with {package.name} (JSON, or Triton's binary tensor extension).",
        "security": [{}, {"bearer": ["infer"]}],
        "parameters": [{
            "name": "Inference-Header-Content-Length",
            "in": "header",
            "required": False,
            "description": "Binary tensor extension: the body is this many bytes of JSON request "
            "header, followed by the raw tensors of the inputs that declare binary_data_size.",
            "schema": {"type": "integer", "minimum": 0},
        }],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {
                    "schema": {"$ref": SCHEMAS + _schema_name("InferRequest", package.name)},
                    "examples": {"one_row": {"summary": "one row of zeros", "value": _example_request(package)}},
                },
                "application/octet-stream": {"schema": {
                    "type": "string", "format": "binary",
                    "description": "Binary tensor extension (needs Inference-Header-Content-Length).",
                }},
            },
        },
        "responses": {
            "200": {
                "description": "Outputs. With binary outputs the body is application/octet-stream: the "
                "JSON response header (Inference-Header-Content-Length bytes), then the raw tensors.",
                "headers": {"Inference-Header-Content-Length": {
                    "description": "Length of the JSON header in a binary response.",
                    "schema": {"type": "integer", "minimum": 0},
                }},
                "content": {
                    "application/json": {"schema": {"$ref": SCHEMAS + _schema_name("InferResponse", package.name)}},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            "404": {"description": "Unknown model or version, or unknown entity ids (entity-id models)",
                    "content": {"application/json": {"schema": {"$ref": SCHEMAS + "Error"}}}},
            **_auth_errors(),
            **_transport_errors(),
            "500": {"description": "The model failed on this request's batch (the message names the model)",
                    "content": {"application/json": {"schema": {"$ref": SCHEMAS + "Error"}}}},
            "503": {"$ref": RESPONSES + "Unavailable"},
        },
    }


def _auth_errors() -> dict[str, Any]:
    return {"401": {"$ref": RESPONSES + "Unauthorized"}, "403": {"$ref": RESPONSES + "Forbidden"}}


def _transport_errors() -> dict[str, Any]:
    return {code: {"$ref": RESPONSES + name} for code, name in _TRANSPORT_ERRORS.items()}


def _path_parameters(packages: dict[str, ModelPackage], versions: list[str]) -> dict[str, Any]:
    return {
        "ModelName": {"name": "model_name", "in": "path", "required": True,
                      "description": "A served model.", "schema": {"type": "string", "enum": list(packages)}},
        "ModelVersion": {"name": "model_version", "in": "path", "required": True,
                         "description": "A served version (of any model: another model's version is 404).",
                         "schema": {"type": "string", "enum": versions}},
        "RepositoryModelName": {"name": "model_name", "in": "path", "required": True,
                                "description": "A model of the repository, served or not.",
                                "schema": {"type": "string", "pattern": MODEL_NAME_PATTERN},
                                "examples": {name: {"value": name} for name in packages}},
    }


def _error_responses() -> dict[str, Any]:
    error = {"application/json": {"schema": {"$ref": SCHEMAS + "Error"}}}
    retry = {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "integer"}}}
    return {
        "BadRequest": {"description": "Malformed HTTP, JSON, or a request that does not fit the signature",
                       "content": error},
        "Unauthorized": {"description": "Authentication is enabled and no valid bearer token was given",
                         "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}}, "content": error},
        "Forbidden": {"description": "The token lacks the scope this operation needs", "content": error},
        "NotFound": {"description": "Unknown model, version or route", "content": error},
        "MethodNotAllowed": {"description": "The route exists but not for this method", "content": error},
        "RequestTimeout": {"description": "The client was too slow sending headers or body", "content": error},
        "PayloadTooLarge": {"description": "The body exceeds the server's limit", "content": error},
        "HeadersTooLarge": {"description": "Too many or too large request headers", "content": error},
        "InternalError": {"description": "A server bug (the request failed alone)", "content": error},
        "Unavailable": {"description": "Draining, overloaded, queue full or deadline missed",
                        "headers": retry, "content": error},
    }


# -- schemas -----------------------------------------------------------------------------

def _common_schemas() -> dict[str, Any]:
    counter = {"type": "object", "required": ["count", "ns"],
               "properties": {"count": {"type": "integer"}, "ns": {"type": "integer"}}}
    tensor_metadata = {
        "type": "object", "required": ["name", "datatype", "shape"],
        "properties": {"name": {"type": "string"}, "datatype": {"enum": sorted(datatypes.PACKAGE_DATATYPES)},
                       "shape": {"type": "array", "items": {"type": "integer"}}},
    }
    config_tensor = {
        "type": "object", "required": ["name", "data_type", "dims"],
        "properties": {"name": {"type": "string"}, "data_type": {"type": "string", "pattern": "^TYPE_"},
                       "dims": {"type": "array", "items": {"type": "integer", "minimum": 1}}},
    }
    return {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Live": {"type": "object", "required": ["live"], "properties": {"live": {"type": "boolean"}}},
        "Ready": {"type": "object", "required": ["ready"], "properties": {"ready": {"type": "boolean"}}},
        "ServerMetadata": {
            "type": "object", "required": ["name", "version", "extensions"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                           "extensions": {"type": "array", "items": {"type": "string"}}},
        },
        "TensorMetadata": tensor_metadata,
        "ModelMetadata": {
            "type": "object", "required": ["name", "versions", "platform", "inputs", "outputs"],
            "properties": {
                "name": {"type": "string"},
                "versions": {"type": "array", "items": {"type": "string"}},
                "platform": {"type": "string"},
                "inputs": {"type": "array", "items": {"$ref": SCHEMAS + "TensorMetadata"}},
                "outputs": {"type": "array", "items": {"$ref": SCHEMAS + "TensorMetadata"}},
                "parameters": {"type": "object", "properties": {"features": {
                    "description": "A model `vivace train` made: its input columns in order; a categorical "
                                   "one is sent as the index of its value in `categories` (-1 unseen), or "
                                   "by name as strings.",
                    "type": "array", "items": {
                        "type": "object", "required": ["name", "kind"],
                        "properties": {"name": {"type": "string"}, "kind": {"enum": ["numeric", "categorical"]},
                                       "categories": {"type": "array", "items": {"type": "string"}}}}}}},
            },
        },
        "ModelConfig": {
            "type": "object",
            "required": ["name", "platform", "max_batch_size", "input", "output", "dynamic_batching"],
            "properties": {
                "name": {"type": "string"},
                "platform": {"type": "string"},
                "backend": {"type": "string"},
                "max_batch_size": {"type": "integer", "minimum": 1},
                "input": {"type": "array", "items": config_tensor},
                "output": {"type": "array", "items": config_tensor},
                "dynamic_batching": {"type": "object"},
                "instance_group": {"type": "array", "items": {"type": "object"}},
                "version_policy": {"type": "object"},
                "parameters": {"type": "object", "additionalProperties": {
                    "type": "object", "required": ["string_value"],
                    "properties": {"string_value": {"type": "string"}}}},
            },
        },
        "Statistics": {
            "type": "object", "required": ["model_stats"],
            "properties": {"model_stats": {"type": "array", "items": {
                "type": "object",
                "required": ["name", "version", "inference_count", "execution_count", "inference_stats"],
                "properties": {
                    "name": {"type": "string"},
                    "version": {"type": "string"},
                    "last_inference": {"type": "integer"},
                    "inference_count": {"type": "integer", "minimum": 0},
                    "execution_count": {"type": "integer", "minimum": 0},
                    "inference_stats": {
                        "type": "object",
                        "properties": {k: counter for k in (
                            "success", "fail", "queue", "compute_input", "compute_infer", "compute_output")},
                    },
                    "batch_stats": {"type": "array"},
                },
            }}},
        },
        "RolloutStatus": {
            "type": "object", "required": ["ref", "stable", "canary", "weight", "sticky", "routed", "shadow"],
            "properties": {
                "ref": {"type": ["string", "null"], "description": "NAME@ALIAS of the rollout; null: none"},
                "stable": {"type": "string"},
                "canary": {"type": ["string", "null"]},
                "weight": {"type": "number", "minimum": 0, "maximum": 100},
                "sticky": {"type": "string"},
                "routed": {"type": "object", "additionalProperties": {"type": "integer"},
                           "description": "requests routed to each version since the rollout was applied"},
                "automatic": {"type": ["object", "null"],
                              "description": "the automatic analysis' policy and latest verdict (null: manual)"},
                "shadow": {"anyOf": [{"type": "null"}, {
                    "type": "object",
                    "required": ["version", "sample", "requests", "failed", "label_disagreements", "max_abs_diff"],
                    "properties": {
                        "version": {"type": "string"}, "sample": {"type": "number"},
                        "requests": {"type": "integer"}, "failed": {"type": "integer"},
                        "label_disagreements": {"type": "integer"}, "max_abs_diff": {"type": "number"},
                        "mean_abs_diff": {"type": ["number", "null"]},
                        "mean_latency_s": {"type": "object"}}}]},
            },
        },
        "DriftStatus": {
            "type": "object", "required": ["model", "version", "rows", "min_rows", "state", "drifting", "features"],
            "properties": {
                "model": {"type": "string"},
                "version": {"type": "string"},
                "rows": {"type": "integer", "minimum": 0},
                "min_rows": {"type": "integer", "minimum": 0,
                             "description": "rows the window needs before a feature can enter the alert state"},
                "state": {"enum": ["collecting", "stable", "drifting"]},
                "drifting": {"type": "array", "items": {"type": "string"},
                             "description": "features in the alert state (hysteresis applies)"},
                "features": {"type": "array", "items": {
                    "type": "object", "required": ["name", "kind", "drifted", "stats"],
                    "properties": {
                        "name": {"type": "string"},
                        "kind": {"enum": ["numeric", "categorical"]},
                        "drifted": {"type": "boolean"},
                        "crossed": {"type": "array", "items": {"type": "string"}},
                        # Non-finite statistics are null: strict JSON has no NaN.
                        "stats": {"type": "object", "additionalProperties": {"type": ["number", "null"]}},
                    },
                }},
                "last_alert_at": {"type": ["number", "null"]},
            },
        },
        "InferParameters": {
            "type": "object",
            "description": "Request parameters; others are ignored.",
            "properties": {
                "priority": {"type": "integer", "minimum": 0,
                             "description": "1 (highest) .. the model's priority levels; 0: the default"},
                "timeout": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1,
                            "description": "Queue timeout in microseconds; 0: the model's default"},
                "binary_data_output": {"type": "boolean",
                                       "description": "Return every output in binary form by default"},
            },
        },
        "OutputParameters": {
            "type": "object",
            "properties": {"binary_data": {"type": "boolean"}},
            "not": {"required": ["classification"]},
        },
        "RepositoryModel": {
            "type": "object", "required": ["name", "version", "state", "reason"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"},
                           "state": {"enum": ["READY", "UNAVAILABLE"]}, "reason": {"type": "string"}},
        },
        "LoadRequest": {
            "type": "object", "additionalProperties": False,
            "properties": {"parameters": {"type": "object", "properties": {
                "ref": {"type": "string", "pattern": MODEL_REF_PATTERN,
                        "description": "NAME@ALIAS or NAME/VERSION, NAME being this model"}}}},
        },
        "Loaded": {
            "type": "object", "required": ["name", "version", "ref"],
            "properties": {"name": {"type": "string"}, "version": {"type": "string"}, "ref": {"type": "string"}},
        },
        "Unloaded": {
            "type": "object", "required": ["name", "unloaded"],
            "properties": {"name": {"type": "string"}, "unloaded": {"type": "array", "items": {"type": "string"}}},
        },
        "AliasRequest": {
            "type": "object", "additionalProperties": False, "required": ["parameters"],
            "properties": {"parameters": {
                "type": "object", "required": ["alias", "version"],
                "properties": {
                    # "latest" and numbers are reserved: they name versions.
                    "alias": {"type": "string", "pattern": MODEL_NAME_PATTERN,
                              "not": {"anyOf": [{"const": "latest"}, {"pattern": "^[0-9]+$"}]}},
                    "version": {"type": "integer", "minimum": 1},
                },
            }},
        },
        "RolloutRequest": {
            "type": "object", "additionalProperties": False, "required": ["parameters"],
            "properties": {"parameters": {
                "type": "object", "required": ["action", "alias"],
                "properties": {
                    "action": {"enum": ["start", "step", "promote", "abort"]},
                    "alias": {"type": "string", "pattern": MODEL_NAME_PATTERN},
                    "canary": {"type": "integer", "minimum": 1}, "shadow": {"type": "integer", "minimum": 1},
                    "weight": {"type": "number", "minimum": 0, "maximum": 100},
                    "sticky": {"type": "string"}, "shadow_sample": {"type": "number"},
                    "policy": {"type": "object"}, "reason": {"type": "string"},
                },
            }},
        },
        "RolloutChanged": {
            "type": "object", "required": ["ref", "action"],
            "properties": {"ref": {"type": "string"}, "action": {"type": "string"},
                           "rollout": {"type": ["object", "null"]}, "previous": {"type": ["integer", "null"]}},
        },
        "PromotionRequestBody": {
            "type": "object", "additionalProperties": False, "required": ["parameters"],
            "properties": {"parameters": {
                "type": "object", "required": ["version", "alias"],
                "properties": {"version": {"type": "integer", "minimum": 1},
                               "alias": {"type": "string", "pattern": MODEL_NAME_PATTERN},
                               "reason": {"type": "string"}},
            }},
        },
        "PromotionRequested": {
            "type": "object", "required": ["request", "requester"],
            "properties": {"request": {"type": "integer"}, "requester": {"type": "string"}},
        },
        "ApprovalBody": {
            "type": "object", "additionalProperties": False, "required": ["parameters"],
            "properties": {"parameters": {
                "type": "object", "required": ["request"],
                "properties": {"request": {"type": "integer", "minimum": 1},
                               "decision": {"enum": ["approve", "reject"]}, "reason": {"type": "string"}},
            }},
        },
        "PromotionDecided": {
            "type": "object", "required": ["request", "decision", "decider"],
            "properties": {"request": {"type": "integer"}, "decision": {"type": "string"},
                           "decider": {"type": "string"}, "previous": {"type": ["integer", "null"]}},
        },
        "FeedbackRequest": {
            "type": "object", "additionalProperties": False, "required": ["labels"],
            "description": "Labels for logged request ids (or entities); the last label of a request row wins.",
            "properties": {"labels": {"type": "array", "maxItems": 10_000, "items": {
                "type": "object", "additionalProperties": False, "required": ["label"],
                "oneOf": [{"required": ["id"]}, {"required": ["entity"]}],
                "properties": {
                    "id": {"type": "string", "minLength": 1, "maxLength": 256,
                           "description": "the request id the prediction log recorded"},
                    "row": {"type": "integer", "minimum": 0, "description": "one row of a multi-row request"},
                    "entity": {"type": "object", "minProperties": 1, "maxProperties": 1,
                               "additionalProperties": {"type": ["integer", "string"]},
                               "description": "{entity-key input: value}: the latest prediction for it"},
                    "time": {"type": "number", "description": "with entity: the prediction at or before this time"},
                    "label": {"anyOf": [{"type": ["number", "boolean"]},
                                        {"type": "array", "minItems": 1, "items": {"type": ["number", "boolean"]}}],
                              "description": "one per row of the request"},
                    "groups": {"type": "object", "maxProperties": 32,
                               "additionalProperties": {"type": ["string", "number", "boolean"]},
                               "description": "sensitive attributes of the row(s), for group metrics"},
                },
            }}},
        },
        "FeedbackAccepted": {
            "type": "object",
            "required": ["model", "received", "joined", "duplicates", "unknown", "mismatched", "unknown_ids"],
            "properties": {"model": {"type": "string"}, "received": {"type": "integer"},
                           "joined": {"type": "integer"}, "duplicates": {"type": "integer"},
                           "unknown": {"type": "integer"}, "mismatched": {"type": "integer"},
                           "unknown_ids": {"type": "array", "items": {"type": "string"}}},
        },
        "Performance": {
            "type": "object", "required": ["model", "version", "state", "labels", "metrics"],
            "properties": {
                "model": {"type": "string"}, "version": {"type": "string"},
                "state": {"enum": ["off", "collecting", "ok", "degraded"]},
                "task": {"enum": ["binary", "regression"]},
                "labels": {"type": "integer"},
                "metrics": {"type": "object", "additionalProperties": {"type": ["number", "null"]}},
                "reliability": {"type": "array", "items": {"type": "object"}},
                "thresholds": {"type": "array", "items": {"type": "object"}},
                "groups": {"type": "object"},
                "importance": {"type": ["object", "null"]},
                "training": {"type": "object"},
            },
        },
        "AliasMoved": {
            "type": "object", "required": ["name", "alias", "version"],
            "properties": {"name": {"type": "string"}, "alias": {"type": "string"}, "version": {"type": "integer"},
                           "previous": {"type": ["integer", "null"]}},
        },
    }


def _model_schemas(packages: dict[str, ModelPackage], versions: dict[str, list[str]],
                   max_body_bytes: int) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    for name, package in packages.items():
        schemas[_schema_name("InferRequest", name)] = _infer_request(package, max_body_bytes)
        schemas[_schema_name("InferResponse", name)] = _infer_response(package, versions[name])
    return schemas


def _schema_name(kind: str, model: str) -> str:
    # Component names allow [A-Za-z0-9._-], which model names already are.
    return f"{kind}.{model}"


def _infer_request(package: ModelPackage, max_body_bytes: int) -> dict[str, Any]:
    specs = package.inputs
    # Each JSON value takes at least two bytes ("0,"), so a body within the server's limit
    # holds at most this many rows of the widest input.
    max_rows = max(1, max_body_bytes // (2 * max(s.row_elements for s in specs)))
    if len(specs) == 1:
        inputs = {"type": "array", "minItems": 1, "maxItems": 1, "items": _input_tensor(specs[0], max_rows)}
    else:
        # Every input exactly once, in any order.
        inputs = {
            "type": "array", "minItems": len(specs), "maxItems": len(specs),
            "items": {"anyOf": [_input_tensor(s, max_rows) for s in specs]},
            "allOf": [{"contains": {"type": "object", "properties": {"name": {"const": s.name}}, "required": ["name"]},
                       "minContains": 1, "maxContains": 1} for s in specs],
        }
    features = RawFeatures.of(package)
    if features is not None:  # or one input per raw feature, by name (engine/oip.py RawFeatures)
        inputs = {"anyOf": [inputs, _feature_inputs(package.metadata["features"], max_rows)]}
    parameters = {"allOf": [{"$ref": SCHEMAS + "InferParameters"}, {"properties": {
        "priority": {"maximum": package.dynamic_batching.priority_levels}}}]}
    return {
        "type": "object",
        "title": f"Inference request for {package.name}",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": parameters,
            "inputs": inputs,
            "outputs": {"type": "array", "items": {
                "type": "object", "required": ["name"],
                "properties": {"name": {"enum": [s.name for s in package.outputs]},
                               "parameters": {"$ref": SCHEMAS + "OutputParameters"}},
            }},
        },
    }


def _input_tensor(spec: TensorSpec, max_rows: int) -> dict[str, Any]:
    """One input: JSON Schema cannot tie `data`'s length to shape[0], so a single row is
    described exactly and a batch by its row shape (data: flat, or nested rows)."""
    element = _element(spec.datatype)
    row = _nested(element, spec.row_shape)
    one_row = {
        "properties": {
            "shape": _shape([{"const": 1}], spec.row_shape),
            "data": {"type": "array", "items": element, "minItems": spec.row_elements,
                     "maxItems": spec.row_elements},
        },
    }
    batch = {
        "properties": {
            "shape": _shape([{"type": "integer", "minimum": 1, "maximum": max_rows}], spec.row_shape),
            "data": {"anyOf": [
                {"type": "array", "items": element, "minItems": spec.row_elements,
                 "description": "flat, row-major: shape[0] x the row's elements"},
                {"type": "array", "items": row, "minItems": 1, "description": "one nested array per row"},
            ]},
        },
    }
    return {
        "type": "object",
        "required": ["name", "shape", "datatype", "data"],
        "properties": {
            "name": {"const": spec.name},
            "datatype": {"const": spec.datatype},
            # binary_data_size belongs to the binary extension (application/octet-stream).
            "parameters": {"type": "object", "not": {"required": ["binary_data_size"]}},
        },
        "anyOf": [one_row, batch],
    }


def _feature_inputs(specs: list[dict[str, Any]], max_rows: int) -> dict[str, Any]:
    """Every raw feature of a trained model exactly once, in any order, as a column: numbers
    (or null) for a numeric feature, strings (or null) as BYTES for a categorical one."""
    def column(spec: dict[str, Any]) -> dict[str, Any]:
        if spec["kind"] == "numeric":
            datatype: dict[str, Any] = {"enum": ["FP16", "FP32", "FP64", *sorted(_INT_RANGES)]}
            value: dict[str, Any] = {"type": ["number", "null"]}
        else:
            datatype, value = {"const": "BYTES"}, {"type": ["string", "null"]}
        rows = {"type": "integer", "minimum": 1, "maximum": max_rows}
        return {
            "type": "object", "required": ["name", "shape", "datatype", "data"],
            "properties": {
                "name": {"const": spec["name"]}, "datatype": datatype,
                "shape": {"type": "array", "prefixItems": [rows, {"const": 1}], "items": False,
                          "minItems": 1, "maxItems": 2},
                "data": {"type": "array", "minItems": 1,
                         "items": {"anyOf": [value, {"type": "array", "items": value, "minItems": 1, "maxItems": 1}]}},
            },
        }

    return {
        "type": "array", "minItems": len(specs), "maxItems": len(specs),
        "description": "the model's raw features by name (see the model metadata's parameters.features)",
        "items": {"anyOf": [column(s) for s in specs]},
        "allOf": [{"contains": {"type": "object", "properties": {"name": {"const": s["name"]}}, "required": ["name"]},
                   "minContains": 1, "maxContains": 1} for s in specs],
    }


def _shape(batch_dim: list[dict[str, Any]], row_shape: tuple[int, ...]) -> dict[str, Any]:
    return {
        "type": "array",
        "prefixItems": [*batch_dim, *({"const": d} for d in row_shape)],
        "items": False,
        "minItems": 1 + len(row_shape),
    }


def _nested(element: dict[str, Any], dims: tuple[int, ...]) -> dict[str, Any]:
    schema = element
    for d in reversed(dims):
        schema = {"type": "array", "items": schema, "minItems": d, "maxItems": d}
    return schema


def _element(datatype: str) -> dict[str, Any]:
    if datatype == "BYTES":  # JSON carries strings; arbitrary bytes take the binary extension
        return {"type": "string"}
    if datatype == "BOOL":
        return {"type": "boolean"}
    if datatype in _INT_RANGES:
        low, high = _INT_RANGES[datatype]
        return {"type": "integer", "minimum": low, "maximum": high}
    limit = _FLOAT_LIMITS.get(datatype)
    return {"type": "number", "minimum": -limit, "maximum": limit} if limit else {"type": "number"}


def _output_element(datatype: str) -> dict[str, Any]:
    """An output value: floats are unbounded, and a non-finite one is null (strict JSON)."""
    if datatype in ("BOOL", "BYTES") or datatype in _INT_RANGES:
        return _element(datatype)
    return {"type": ["number", "null"]}


def _infer_response(package: ModelPackage, versions: list[str]) -> dict[str, Any]:
    outputs = []
    for spec in package.outputs:
        outputs.append({
            "type": "object",
            "required": ["name", "datatype", "shape"],
            "properties": {
                "name": {"const": spec.name},
                "datatype": {"const": spec.datatype},
                # Without prefixItems: schemathesis 4.32 rejects them in response schemas.
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 1},
                          "minItems": len(spec.shape), "maxItems": len(spec.shape)},
                "data": {"type": "array", "items": _output_element(spec.datatype)},
                "parameters": {"type": "object", "properties": {
                    "binary_data_size": {"type": "integer", "minimum": 0}}},
            },
        })
    return {
        "type": "object",
        "title": f"Inference response of {package.name}",
        "required": ["model_name", "model_version", "outputs"],
        "properties": {
            "model_name": {"const": package.name},
            "model_version": {"enum": versions},
            "id": {"type": "string"},
            "outputs": {"type": "array", "minItems": 1, "maxItems": len(outputs),
                        "items": {"anyOf": outputs} if len(outputs) > 1 else outputs[0]},
        },
    }


def _example_request(package: ModelPackage) -> dict[str, Any]:
    """A valid one-row request of zeros (false for BOOL)."""
    return {"inputs": [
        {"name": s.name, "shape": [1, *s.row_shape], "datatype": s.datatype,
         "data": [{"BOOL": False, "BYTES": ""}.get(s.datatype, 0)] * s.row_elements}
        for s in package.inputs
    ]}
