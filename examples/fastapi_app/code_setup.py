"""The example app with explicit (code) setup, for services that configure OpenTelemetry themselves.

Run:  uvicorn examples.fastapi_app.code_setup:app --port 8000
Records go to $O2_AUDIT_ENDPOINT, or to /tmp/o2audit-example.jsonl when it is unset. Do not also run this
module under ``opentelemetry-instrument``: the app would be instrumented (and audited) twice.
"""

import os

from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider

import otel_o2audit

from .app import app

# service.name becomes every record's service_name. Spans still go to your usual exporters if you add them
# to this provider; auditing needs none.
provider = TracerProvider(resource=Resource.create({"service.name": "dashboards-api"}))

# Audit the SERVER spans of this provider. Keywords take precedence over the O2_AUDIT_* environment; a bad
# value raises otel_o2audit.ConfigError here, at import time, rather than at the first request.
otel_o2audit.install(
    provider,
    endpoint=os.environ.get("O2_AUDIT_ENDPOINT", "file:///tmp/o2audit-example.jsonl"),
)

# The instrumentation creates the SERVER spans. Passing the provider (instead of setting it globally) keeps
# this app's audit trail independent of whatever else runs in the process.
fastapi_app = app
FastAPIInstrumentor.instrument_app(fastapi_app, tracer_provider=provider)

# Outermost: the library's middleware sees what spans do not carry (the socket peer, X-Forwarded-For from
# trusted proxies, the Basic-auth username, the raw query string, bodies when O2_AUDIT_CAPTURE_BODY=true).
app = otel_o2audit.O2AuditASGIMiddleware(fastapi_app)

# Nothing to do at shutdown: install() also publishes pending records at interpreter exit and on
# SIGTERM/SIGINT (uvicorn re-raises SIGTERM after its graceful shutdown, which would skip atexit).

__all__ = ["app", "fastapi_app"]
