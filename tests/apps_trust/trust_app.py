"""A FastAPI application for the zero-code trust tests: no OpenTelemetry or otel_o2audit code in it.

The tests run it under ``opentelemetry-instrument`` and configure everything through ``O2_AUDIT_*``. Routes:
a login that fails (401) unless the Basic password is right, an echo that reports the SHA-256 of the body it
received (so tests can check the application saw every byte unchanged), and ``/debug/hooked``, which tells
whether the library's framework hook is in place (a test of the wiring, not a use of the library).
"""

from __future__ import annotations

import base64
import hashlib
from typing import Any, Dict

from fastapi import FastAPI, Request, Response
from starlette.applications import Starlette

app = FastAPI(title="zero-code-trust-app")


@app.get("/healthz")
async def healthz() -> Dict[str, str]:
    return {"status": "ok"}


@app.get("/debug/hooked")
async def hooked() -> Dict[str, bool]:
    return {"hooked": bool(getattr(Starlette.__call__, "_otel_o2audit", False))}


@app.get("/api/{org_id}/whoami")
async def whoami(org_id: str, request: Request) -> Dict[str, Any]:
    client = request.client
    return {"org_id": org_id, "client": client.host if client else None}


@app.post("/api/{org_id}/login")
async def login(org_id: str, request: Request, response: Response) -> Dict[str, Any]:
    await request.body()
    header = request.headers.get("authorization", "")
    ok = False
    if header.lower().startswith("basic "):
        _user, _, password = base64.b64decode(header[6:]).decode("utf-8", "replace").partition(":")
        ok = password == "correct horse"
    if not ok:
        response.status_code = 401
    return {"ok": ok}


@app.post("/api/{org_id}/echo")
async def echo(org_id: str, request: Request) -> Dict[str, Any]:
    body = await request.body()
    return {"size": len(body), "sha256": hashlib.sha256(body).hexdigest()}
