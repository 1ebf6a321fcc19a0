"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import anyio
import orjson
from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST

from ...fhir import operation_outcome
from ..deps import RuntimeDep, json_response
from ..errors import FHIR_JSON

router = APIRouter(tags=["operations"])


@router.get("/healthz", summary="Liveness")
@router.head("/healthz", include_in_schema=False)  # load balancers' checks may be a HEAD
async def healthz() -> Response:
    return json_response({"status": "alive"})


@router.get("/readyz", summary="Readiness: database reachable and rules loaded")
@router.head("/readyz", include_in_schema=False)
async def readyz(runtime: RuntimeDep) -> Response:
    state = await runtime.store.run(runtime.readiness)
    problems = state["problems"]
    if problems:
        return Response(orjson.dumps(operation_outcome("not ready: " + "; ".join(problems), code="transient")),
                        status_code=503, media_type=FHIR_JSON)
    return json_response({k: v for k, v in state.items() if k != "problems"} | {"status": "ready"})


@router.get("/metrics", summary="Prometheus metrics")
async def metrics(runtime: RuntimeDep) -> Response:
    if await anyio.to_thread.run_sync(runtime.store.ping):
        await anyio.to_thread.run_sync(runtime.between_visits)  # the outbox and subscription gauges, fresh
    return Response(runtime.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
