"""Subprocess probe for test_metrics.py: the ``o2audit.records`` counter against a GLOBAL MeterProvider.

``python -m tests.apps_extra.metrics_probe MODE AUDIT_FILE`` sets a ``MeterProvider(metric_readers=
[InMemoryMetricReader()])`` as the global meter provider before (``MODE=before``) or after (``MODE=after``)
``otel_o2audit.install``, serves requests to a FastAPI app through TestClient, and prints one JSON object:
for each of two rounds, ``stats()`` right before and right after a collection and the points collected.
Global meter state cannot be undone, hence a process of its own.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Dict, List

from fastapi import FastAPI
from fastapi.testclient import TestClient
from opentelemetry import metrics
from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider

import otel_o2audit


def collect(reader: InMemoryMetricReader) -> List[Dict[str, Any]]:
    """Every ``o2audit.records`` metric in one collection, with its scope, type and points."""
    found: List[Dict[str, Any]] = []
    data = reader.get_metrics_data()
    for resource_metrics in data.resource_metrics if data is not None else ():
        for scope_metrics in resource_metrics.scope_metrics:
            for metric in scope_metrics.metrics:
                if metric.name != "o2audit.records":
                    continue
                found.append({
                    "scope": scope_metrics.scope.name,
                    "unit": metric.unit,
                    "type": type(metric.data).__name__,
                    "monotonic": getattr(metric.data, "is_monotonic", None),
                    "temporality": getattr(getattr(metric.data, "aggregation_temporality", None), "name", None),
                    "points": [{"attributes": dict(p.attributes or {}), "value": p.value}
                               for p in metric.data.data_points],
                })
    return found


def main() -> None:
    mode, audit_file = sys.argv[1], sys.argv[2]
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader], shutdown_on_exit=False)
    if mode == "before":
        metrics.set_meter_provider(meter_provider)
    provider = TracerProvider(shutdown_on_exit=False)
    processor = otel_o2audit.install(provider, endpoint=f"file://{audit_file}", publish_interval=0.2)
    if mode == "after":
        metrics.set_meter_provider(meter_provider)

    app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False})  # type: ignore[arg-type]

    @app.get("/api/{org_id}/items/{item_id}")
    async def get_item(org_id: str, item_id: int) -> Dict[str, Any]:
        return {"org_id": org_id, "item_id": item_id}

    @app.get("/healthz")
    async def healthz() -> Dict[str, str]:
        return {"status": "ok"}

    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    rounds = []
    with TestClient(app) as client:
        for audited, probes in ((3, 1), (2, 2)):
            for i in range(audited):
                assert client.get(f"/api/acme/items/{i}").status_code == 200
            for _ in range(probes):
                assert client.get("/healthz").status_code == 200  # skipped: excluded from the audit
            assert processor.force_flush(5000) is True
            before = otel_o2audit.stats()
            collected = collect(reader)
            after = otel_o2audit.stats()
            rounds.append({"stats_before": before, "stats_after": after, "metrics": collected})
    processor.shutdown()
    provider.shutdown()
    meter_provider.shutdown()
    sys.stdout.write(json.dumps({"keys": list(otel_o2audit.COUNTER_KEYS), "rounds": rounds}) + "\n")


if __name__ == "__main__":
    main()
