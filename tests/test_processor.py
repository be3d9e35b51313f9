"""O2AuditSpanProcessor with real FastAPI apps, a real SDK TracerProvider and the loopback FakeOpenObserve.

Batching triggers, classification before batching, flush and shutdown, queue overflow, RECORD_ONLY spans,
robustness of on_end and of the worker, install() rules, and fork safety.
"""

from __future__ import annotations

import json
import logging
import os
import time
import traceback
from typing import Any, List, Optional, Sequence

import pytest
from fastapi.testclient import TestClient
from inproc import (
    Counters,
    Harness,
    assert_stays,
    make_app,
    settings_for,
    wait_child,
    wait_until,
)
from o2receiver import FakeOpenObserve
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import Decision, Sampler, SamplingResult
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.span import TraceState
from opentelemetry.util.types import Attributes

import otel_o2audit
from otel_o2audit import O2AuditSpanProcessor


def get_many(client: TestClient, count: int, org: str = "acme", start: int = 0) -> None:
    for i in range(start, start + count):
        assert client.get(f"/api/{org}/things/{i}").status_code == 200


def sizes(requests: Sequence[Any]) -> List[int]:
    return [len(r.records or []) for r in requests]


def otel_messages(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == "otel_o2audit" and r.levelno >= level]


# --------------------------------------------------------------------------------------------------
# publish triggers
# --------------------------------------------------------------------------------------------------


def test_batch_size_triggers_a_publish_of_exactly_batch_size(receiver: FakeOpenObserve, harness: Harness) -> None:
    provider, processor = harness.processor(receiver, batch_size=5, publish_interval=60)
    with TestClient(make_app(provider)) as client:
        get_many(client, 5)
        (first,) = receiver.wait_for_requests(1, timeout=5)
        assert sizes([first]) == [5]

        get_many(client, 7, start=5)
        requests = receiver.wait_for_requests(2, timeout=5)
        assert sizes(requests) == [5, 5]
        assert_stays(lambda: len(receiver.ingestion_requests()) == 2, 0.3,
                     "2 records pending, below the batch size, must wait for the interval or a flush")

    assert processor.force_flush(5000) is True
    requests = receiver.wait_for_requests(3)
    assert sizes(requests) == [5, 5, 2]
    paths = [r["http_path"] for r in receiver.records_for()]
    assert paths == [f"/api/acme/things/{i}" for i in range(12)]


def test_publish_interval_triggers_without_flush(receiver: FakeOpenObserve, harness: Harness) -> None:
    interval = 0.3
    provider, _ = harness.processor(receiver, batch_size=1000, publish_interval=interval)
    with TestClient(make_app(provider)) as client:
        started = time.monotonic()
        get_many(client, 3)
        sent = time.monotonic()

        records = receiver.wait_for_records(3, timeout=interval + 3)

    (request,) = receiver.ingestion_requests()
    assert sizes([request]) == [3]
    assert len(records) == 3
    # Published because the oldest record was due, not earlier and not much later.
    assert request.time - started >= interval - 0.05
    assert request.time - sent <= interval + 1.5


def test_no_request_exceeds_batch_size(receiver: FakeOpenObserve, harness: Harness) -> None:
    provider, processor = harness.processor(receiver, batch_size=10, publish_interval=60)
    with TestClient(make_app(provider)) as client:
        get_many(client, 53)
        receiver.wait_for_records(50, timeout=5)

    assert processor.force_flush(5000) is True
    records = receiver.wait_for_records(53, timeout=3)
    requests = receiver.ingestion_requests()
    assert all(size <= 10 for size in sizes(requests)), sizes(requests)
    assert sizes(requests) == [10, 10, 10, 10, 10, 3]
    assert len({r["event_id"] for r in records}) == 53


def test_ingestion_and_health_requests_do_not_count_toward_the_batch(receiver: FakeOpenObserve,
                                                                      harness: Harness) -> None:
    provider, _ = harness.processor(receiver, batch_size=5, publish_interval=60)
    counters = Counters()
    with TestClient(make_app(provider)) as client:
        for _ in range(5):
            assert client.get("/healthz").status_code == 200
        for i in range(5):
            assert client.post(f"/api/acme/stream{i}/_json", json=[{"a": 1}]).status_code == 200
        get_many(client, 4)
        # The worker wakes for the 10 unaudited spans (the intake filled up twice) and skips them all.
        wait_until(lambda: counters["skipped"] == 10, timeout=5, message="the worker to skip the 10 spans")
        assert_stays(lambda: receiver.ingestion_requests() == [], 0.3,
                     "4 audited records (plus 10 skipped spans) must not make a batch of 5")

        get_many(client, 1, start=4)
        (request,) = receiver.wait_for_requests(1, timeout=5)

    assert sizes([request]) == [5]
    assert [r["http_path"] for r in request.records or []] == [f"/api/acme/things/{i}" for i in range(5)]


# --------------------------------------------------------------------------------------------------
# flush and shutdown
# --------------------------------------------------------------------------------------------------


def test_force_flush_publishes_everything_and_returns_true(receiver: FakeOpenObserve, harness: Harness) -> None:
    provider, processor = harness.processor(receiver, batch_size=100, publish_interval=60)
    with TestClient(make_app(provider)) as client:
        get_many(client, 7)

    assert processor.force_flush(5000) is True

    assert len(receiver.records_for()) == 7
    assert sizes(receiver.ingestion_requests()) == [7]
    assert processor.force_flush(5000) is True  # nothing pending: still True, nothing sent
    assert len(receiver.ingestion_requests()) == 1


def test_force_flush_returns_false_when_delivery_fails(receiver: FakeOpenObserve, harness: Harness) -> None:
    provider, processor = harness.processor(receiver, batch_size=100, publish_interval=60)
    receiver.respond_status(400)
    with TestClient(make_app(provider)) as client:
        get_many(client, 2)

    assert processor.force_flush(5000) is False


def test_shutdown_publishes_pending_then_drops_later_records(receiver: FakeOpenObserve, harness: Harness,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    provider, processor = harness.processor(receiver, batch_size=100, publish_interval=60)
    app = make_app(provider)
    counters = Counters()
    with TestClient(app) as client:
        get_many(client, 4)
        processor.shutdown()
        assert len(receiver.records_for()) == 4, "shutdown must publish what is pending before returning"
        assert processor.is_shut_down

        get_many(client, 2, start=4)

    assert counters["dropped"] == 2
    assert counters["published"] == 4
    assert len(receiver.ingestion_requests()) == 1
    assert any("after the audit processor was shut down" in m for m in otel_messages(caplog, logging.WARNING))
    assert processor.force_flush(1000) is False


def test_shutdown_interrupts_a_stuck_publish(receiver: FakeOpenObserve, harness: Harness) -> None:
    provider, processor = harness.processor(receiver, batch_size=3, publish_interval=60,
                                            retry_initial_backoff=20, retry_max_elapsed=120)
    receiver.respond_status(503, times=1000)
    counters = Counters()
    with TestClient(make_app(provider)) as client:
        get_many(client, 3)
        receiver.wait_for_requests(1, timeout=5)

        started = time.monotonic()
        processor.shutdown(timeout_millis=200)
        elapsed = time.monotonic() - started

    assert elapsed < 2.0, f"shutdown(200 ms) took {elapsed:.2f}s with a publish stuck in a 20s backoff"
    assert counters["lost"] == 3


def test_queue_overflow_drops_new_records_counts_and_warns(receiver: FakeOpenObserve, harness: Harness,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    provider, processor = harness.processor(receiver, batch_size=2, max_queue_size=4, publish_interval=60,
                                            timeout=5)
    counters = Counters()
    receiver.hold()
    with TestClient(make_app(provider)) as client:
        get_many(client, 2)  # one batch, now in flight and held by the receiver
        receiver.wait_until(lambda: any(r.state == "held" for r in receiver.ingestion_requests()), 5,
                            "the first batch to be held")
        get_many(client, 5, start=2)  # 2 fit (2 in flight + 2 queued = 4), the other 3 are dropped

        # The bound is checked without a lock on the request path, so allow a racing admission or two;
        # what must hold is that overflow drops NEW records, counts each one, and never evicts old ones.
        dropped = counters["dropped"]
        assert 1 <= dropped <= 3, counters.delta()
        assert otel_o2audit.stats()["dropped"] >= dropped
        receiver.release()
        receiver.wait_for_records(7 - dropped, timeout=5)

    wait_until(lambda: any("DROPPED" in m for m in otel_messages(caplog, logging.WARNING)),
               timeout=5, message="the drop warning")
    assert processor.force_flush(5000) is True
    paths = [r["http_path"] for r in receiver.records_for()]
    assert paths == [f"/api/acme/things/{i}" for i in range(7 - dropped)], "the OLDEST records are kept"
    assert counters["captured"] == 7 - dropped
    assert counters["published"] == 7 - dropped


# --------------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------------


class RecordOnlySampler(Sampler):
    """Records every span but samples none (what AlwaysRecordSampler does under a ratio that says no)."""

    def should_sample(self, parent_context: Optional[Context], trace_id: int, name: str,
                      kind: Optional[SpanKind] = None, attributes: Attributes = None,
                      links: Optional[Sequence[Link]] = None, trace_state: Optional[TraceState] = None,
                      ) -> SamplingResult:
        return SamplingResult(Decision.RECORD_ONLY, attributes)

    def get_description(self) -> str:
        return "RecordOnlySampler"


def test_record_only_spans_are_audited(receiver: FakeOpenObserve, harness: Harness) -> None:
    provider = harness.provider(sampler=RecordOnlySampler())
    memory = InMemorySpanExporter()
    bsp = BatchSpanProcessor(memory, schedule_delay_millis=60_000)
    provider.add_span_processor(bsp)
    _, processor = harness.processor(receiver, provider)
    with TestClient(make_app(provider)) as client:
        get_many(client, 3)

    assert processor.force_flush(5000) is True
    records = receiver.wait_for_records(3, timeout=3)
    assert [r["http_path"] for r in records] == [f"/api/acme/things/{i}" for i in range(3)]
    assert bsp.force_flush(5000)
    assert memory.get_finished_spans() == (), "the SDK's BatchSpanProcessor drops RECORD_ONLY spans"


# --------------------------------------------------------------------------------------------------
# robustness
# --------------------------------------------------------------------------------------------------


def test_on_end_never_raises_and_a_conversion_error_is_counted(receiver: FakeOpenObserve, harness: Harness,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    provider, processor = harness.processor(receiver, batch_size=100, publish_interval=60)
    tracer = provider.get_tracer("weird")
    counters = Counters()
    weird = {
        "/weird/str-status": {"http.method": "GET", "http.status_code": "404"},
        "/weird/bad-status": {"http.method": "get", "http.status_code": "not-a-number"},
        "/weird/other-method": {"http.request.method": "_OTHER", "http.request.method_original": "PURGE",
                                "http.response.status_code": 500},
        "/weird/tuple": {"http.method": "GET", "http.route": ("/a", "/b"), "http.status_code": [200, 201]},
        "/weird/long-agent": {"http.method": "GET", "http.user_agent": "é" * 3000, "http.status_code": True},
        "/weird/inf-status": {"http.method": "GET", "http.status_code": float("inf")},
    }
    for path, attributes in weird.items():
        target = {"url.path": path} if "http.request.method" in attributes else {"http.target": path}
        span = tracer.start_span(f"GET {path}", kind=SpanKind.SERVER, attributes={**attributes, **target})
        span.end()  # on_end runs in here: it must not raise
    # A broken URL and a server span that is not HTTP at all.
    span = tracer.start_span("GET /weird/url", kind=SpanKind.SERVER,
                             attributes={"http.method": "GET", "http.url": "http://[::1/broken?token=x"})
    span.end()
    tracer.start_span("not http", kind=SpanKind.SERVER).end()

    assert processor.force_flush(5000) is True
    by_path = {r["http_path"]: r for r in receiver.records_for()}
    assert by_path["/weird/str-status"]["http_response_code"] == 404
    assert by_path["/weird/bad-status"]["http_response_code"] == 0
    assert by_path["/weird/bad-status"]["http_method"] == "GET"
    assert by_path["/weird/other-method"]["http_method"] == "PURGE"
    assert "error_msg" in by_path["/weird/other-method"]
    assert len(by_path["/weird/long-agent"]["user_agent"].encode("utf-8")) <= 1024
    audited = len(weird) + 1
    delta = counters.delta()
    assert delta["published"] + delta["lost"] == audited, delta
    if "/weird/inf-status" not in by_path:
        # The conversion failed in the worker: counted as lost and logged, never silent.
        assert delta["lost"] == 1
        assert any("could not convert span" in m for m in otel_messages(caplog, logging.ERROR))

    # The worker survived: an ordinary request is still delivered.
    with TestClient(make_app(provider)) as client:
        get_many(client, 1, org="after")
    assert processor.force_flush(5000) is True
    assert receiver.records_for()[-1]["http_path"] == "/api/after/things/0"


# --------------------------------------------------------------------------------------------------
# install()
# --------------------------------------------------------------------------------------------------


def test_install_twice_returns_the_same_processor_added_once(receiver: FakeOpenObserve, harness: Harness,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    provider = harness.provider()
    first = harness.install(provider, receiver)
    second = otel_o2audit.install(provider)
    third = otel_o2audit.install(provider, **settings_for(receiver, batch_size=7))

    assert first is second is third
    assert isinstance(first, O2AuditSpanProcessor)
    assert any("already installed" in m for m in otel_messages(caplog, logging.WARNING))
    registered = provider._active_span_processor._span_processors  # the SDK keeps them here
    assert sum(p is first for p in registered) == 1

    with TestClient(make_app(provider)) as client:
        get_many(client, 2)
    assert first.force_flush(5000) is True
    assert len(receiver.records_for()) == 2, "one record per request, not one per install() call"


@pytest.mark.parametrize("provider", [trace.NoOpTracerProvider(), trace.ProxyTracerProvider(), object()],
                         ids=["noop", "proxy", "object"])
def test_install_on_a_non_sdk_provider_raises_type_error(provider: Any, receiver: FakeOpenObserve) -> None:
    with pytest.raises(TypeError, match="SDK TracerProvider"):
        otel_o2audit.install(provider, **settings_for(receiver))


# --------------------------------------------------------------------------------------------------
# fork
# --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not hasattr(os, "fork"), reason="POSIX fork only")
def test_forked_child_publishes_its_own_records_with_its_own_worker(receiver: FakeOpenObserve, harness: Harness,
                                                                    tmp_path: Any) -> None:
    provider, processor = harness.processor(receiver, batch_size=100, publish_interval=60)
    app = make_app(provider)
    with TestClient(app) as client:
        get_many(client, 3, org="parent")  # pending in the parent: below the batch size, interval far away
    report = tmp_path / "child.json"

    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child, which reports through the file and its exit code
        code = 70
        try:
            with TestClient(app) as child_client:
                get_many(child_client, 1, org="child")
            flushed = processor.force_flush(5000)
            report.write_text(json.dumps({"flushed": flushed, "stats": otel_o2audit.stats()}))
            code = 0 if flushed else 71
        except BaseException:
            report.write_text(json.dumps({"error": traceback.format_exc()}))
        finally:
            os._exit(code)

    status = wait_child(pid, timeout=20)
    child = json.loads(report.read_text()) if report.exists() else {}
    assert os.WIFEXITED(status), child
    assert os.WEXITSTATUS(status) == 0, child
    assert child["flushed"] is True
    assert child["stats"]["captured"] == 1, "the child's counters and queue start empty"
    assert child["stats"]["published"] == 1

    (child_request,) = receiver.wait_for_requests(1, timeout=5)
    assert [r["org_id"] for r in child_request.records or []] == ["child"], "the child sent only its own record"

    assert processor.force_flush(5000) is True, "the parent still owns its pending records"
    requests = receiver.wait_for_requests(2, timeout=5)
    assert len(requests) == 2
    assert [r["org_id"] for r in requests[1].records or []] == ["parent", "parent", "parent"]
    assert [r["http_path"] for r in receiver.records_for()] == [
        "/api/child/things/0", "/api/parent/things/0", "/api/parent/things/1", "/api/parent/things/2",
    ]


def test_provider_shutdown_shuts_the_processor_down(receiver: FakeOpenObserve, harness: Harness) -> None:
    provider: TracerProvider = harness.provider()
    _, processor = harness.processor(receiver, provider)
    with TestClient(make_app(provider)) as client:
        get_many(client, 2)

    provider.shutdown()

    assert processor.is_shut_down
    assert len(receiver.records_for()) == 2


# --------------------------------------------------------------------------------------------------
# a redaction policy of the application's own
# --------------------------------------------------------------------------------------------------


class _InternalIdsAreSecret(otel_o2audit.Redactor):
    """An application policy: the default names, plus anything starting with ``internal``."""

    def is_sensitive(self, name: str) -> bool:
        return super().is_sensitive(name) or name.lower().startswith("internal")


def test_install_takes_a_redaction_policy_of_the_applications_own(receiver: FakeOpenObserve,
                                                                   harness: Harness) -> None:
    provider = harness.provider()
    processor = otel_o2audit.install(provider, redactor=_InternalIdsAreSecret(), **settings_for(
        receiver, batch_size=10, publish_interval=60))
    harness.track(processor)
    with TestClient(make_app(provider)) as client:
        client.get("/api/acme/things/1?internal_ref=abc123&token=t0k&page=2")
    assert processor.force_flush(5000) is True
    (record,) = receiver.records_for()
    assert record["http_query_params"] == "internal_ref=[REDACTED]&token=[REDACTED]&page=2"
