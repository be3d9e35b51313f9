"""A FastAPI application for the zero-code sampling tests: no setup code, only what a request needs.

``/propagate`` answers the trace headers the application would send downstream (``opentelemetry.propagate
.inject`` into a dict), so a test can see the sampled flag a RECORD_ONLY server span propagates.
"""

from __future__ import annotations

from typing import Dict

from fastapi import FastAPI
from opentelemetry import propagate

app = FastAPI(title="sampling-test-app")


@app.get("/healthz")
async def healthz() -> Dict[str, str]:
    return {"status": "ok"}


@app.get("/api/{org_id}/items/{item_id}")
async def get_item(org_id: str, item_id: int) -> Dict[str, object]:
    return {"org_id": org_id, "item_id": item_id}


@app.get("/propagate")
async def propagate_headers() -> Dict[str, str]:
    carrier: Dict[str, str] = {}
    propagate.inject(carrier)
    return carrier
