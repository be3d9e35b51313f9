"""An external FastAPI application for the zero-code tests (independent of ``examples/``).

It has no OpenTelemetry code at all: the tests run it under ``opentelemetry-instrument uvicorn`` (or gunicorn
with ``UvicornWorker``) and configure auditing purely through the environment. Besides a few org-scoped
routes shaped like OpenObserve's API it offers two debug routes the tests use to look inside the process:
``/debug/threads`` (names of the live threads) and ``/debug/pid``.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Dict, List

from fastapi import FastAPI, HTTPException, Request, Response

app = FastAPI(title="zero-code-test-app")

_dashboards: Dict[str, Dict[str, Any]] = {}
_lock = threading.Lock()


@app.get("/healthz")
async def healthz() -> Dict[str, str]:
    return {"status": "ok"}


@app.get("/debug/threads")
def debug_threads() -> List[str]:
    return [t.name for t in threading.enumerate()]


@app.get("/debug/pid")
async def debug_pid() -> Dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/api/{org_id}/whoami")
async def whoami(org_id: str) -> Dict[str, Any]:
    """An audited route that says which worker process answered."""
    return {"org_id": org_id, "pid": os.getpid()}


@app.post("/auth/login")
async def login(request: Request) -> Dict[str, str]:
    body = await request.json()
    return {"email": str(body.get("email", "")), "token": "not-a-real-token"}


@app.get("/api/{org_id}/dashboards")
async def list_dashboards(org_id: str, page: int = 1) -> Dict[str, Any]:
    with _lock:
        items = [d for d in _dashboards.values() if d["org_id"] == org_id]
    return {"dashboards": items, "page": page}


@app.post("/api/{org_id}/dashboards", status_code=201)
async def create_dashboard(org_id: str, request: Request) -> Dict[str, Any]:
    body = await request.json()
    with _lock:
        dashboard_id = str(len(_dashboards) + 1)
        _dashboards[dashboard_id] = {"org_id": org_id, "id": dashboard_id, "title": str(body.get("title", ""))}
        return _dashboards[dashboard_id]


@app.get("/api/{org_id}/dashboards/{dashboard_id}")
async def get_dashboard(org_id: str, dashboard_id: str) -> Dict[str, Any]:
    with _lock:
        found = _dashboards.get(dashboard_id)
    if found is None or found["org_id"] != org_id:
        raise HTTPException(404, f"dashboard {dashboard_id} not found in {org_id}")
    return found


@app.get("/api/{org_id}/reports/broken")
async def broken_report(org_id: str) -> None:
    raise RuntimeError(f"report renderer crashed for org {org_id}")


@app.delete("/api/{org_id}/settings", status_code=204)
async def reset_settings(org_id: str) -> Response:
    raise HTTPException(403, "only administrators can reset organization settings")


@app.post("/api/{org_id}/{stream}/_json")
async def ingest_json(org_id: str, stream: str, request: Request) -> Dict[str, Any]:
    records = await request.json()
    count = len(records) if isinstance(records, list) else 1
    return {"code": 200, "status": [{"name": stream, "successful": count, "failed": 0}]}
