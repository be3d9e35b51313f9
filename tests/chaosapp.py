"""A tiny FastAPI application for the chaos tests (``tests/test_chaos.py``), run in a subprocess.

It has no OpenTelemetry code: the tests start it under ``opentelemetry-instrument uvicorn`` (or gunicorn with
``UvicornWorker``) with ``O2_AUDIT_ENABLED=true`` and the loopback receiver as the endpoint. Importable as
``chaosapp:app`` (``PYTHONPATH=tests``) or ``tests.chaosapp:app`` (from the repository root).

Routes:

* ``GET /api/{org_id}/items/{item}``: the audited route the traffic hits; answers the worker's pid.
* ``GET /healthz``: readiness probe (excluded from the audit by the default exclusions).
* ``GET /__stats``: this process's ``otel_o2audit.stats()`` and pid, so a test can account for every record
  without parsing logs; the tests exclude it with ``O2_AUDIT_EXCLUDE_ROUTES=default,/__stats``.

Test hook: ``CHAOS_RETRY_LATER`` (seconds), when set, lowers the cap (30 s) of the processor's backoff before
it retries a batch the spool kept (``otel_o2audit.processor._RETRY_LATER``).
"""

from __future__ import annotations

import os
from typing import Any, Dict

from fastapi import FastAPI

import otel_o2audit

app = FastAPI(title="o2audit-chaos-app")

_retry_later = os.environ.get("CHAOS_RETRY_LATER", "").strip()
if _retry_later:
    from otel_o2audit import processor as _processor

    _processor._RETRY_LATER = float(_retry_later)


@app.get("/healthz")
async def healthz() -> Dict[str, str]:
    return {"status": "ok"}


@app.get("/__stats")
async def audit_stats() -> Dict[str, Any]:
    return {"pid": os.getpid(), "stats": otel_o2audit.stats()}


@app.get("/api/{org_id}/items/{item}")
async def get_item(org_id: str, item: str) -> Dict[str, Any]:
    return {"org_id": org_id, "item": item, "pid": os.getpid()}
