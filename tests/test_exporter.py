"""O2AuditSpanExporter against the loopback FakeOpenObserve: wire format, outcomes, retries, shutdown, secrets.

Spans come from a real SDK tracer; every request goes over real HTTP to 127.0.0.1. Nothing of ours is mocked.
"""

from __future__ import annotations

import base64
import gzip
import inspect
import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, Iterator, List

import pytest
from inproc import (
    CORE_KEYS,
    Counters,
    Harness,
    SpanMaker,
    event_ids,
    records_of,
    wait_until,
)
from o2receiver import TOO_OLD_ERROR, FakeOpenObserve
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExportResult
from opentelemetry.trace import SpanKind

from otel_o2audit import ConfigError, DeliveryReport, O2AuditConfig, O2AuditSpanProcessor

PASSWORD = "Pw-7f3a9c-NEVER-LOG-ME"


@pytest.fixture
def receiver() -> Iterator[FakeOpenObserve]:
    fake = FakeOpenObserve(password=PASSWORD).start()
    try:
        yield fake
    finally:
        fake.stop()
    assert fake.server_errors == []


@pytest.fixture
def spans() -> Iterator[SpanMaker]:
    maker = SpanMaker()
    try:
        yield maker
    finally:
        maker.close()


def otel_messages(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == "otel_o2audit" and r.levelno >= level]


def decoded_body(request: Any) -> List[Dict[str, Any]]:
    return json.loads(gzip.decompress(request.body).decode("utf-8"))


# --------------------------------------------------------------------------------------------------
# wire format and destination
# --------------------------------------------------------------------------------------------------


def test_request_is_gzipped_json_with_basic_auth(receiver: FakeOpenObserve, harness: Harness,
                                                 spans: SpanMaker) -> None:
    exporter = harness.exporter(receiver)
    batch = spans.requests(3)

    assert exporter.export(batch) is SpanExportResult.SUCCESS

    (request,) = receiver.wait_for_requests(1)
    assert request.status == 200
    assert request.path == "/api/_meta/audit/_json"
    assert request.headers["content-encoding"] == "gzip"
    assert request.headers["content-type"] == "application/json"
    scheme, _, token = request.headers["authorization"].partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(token).decode("utf-8") == f"{receiver.user}:{PASSWORD}"
    sent = decoded_body(request)
    assert isinstance(sent, list)
    assert [r["http_path"] for r in sent] == ["/api/acme/things/0", "/api/acme/things/1", "/api/acme/things/2"]
    for record in sent:
        assert set(record) >= CORE_KEYS


def test_records_land_in_meta_audit_by_default(receiver: FakeOpenObserve, harness: Harness,
                                               spans: SpanMaker) -> None:
    exporter = harness.exporter(receiver)
    batch = spans.requests(4)
    expected = event_ids(records_of(exporter, batch))

    exporter.export(batch)

    stored = receiver.wait_for_records(4, timeout=3, org="_meta", stream="audit")
    assert event_ids(stored) == expected
    assert all(r["protocol"] == "http" and r["service_name"] == "inproc-tests" for r in stored)


def test_custom_org_and_stream(receiver: FakeOpenObserve, harness: Harness, spans: SpanMaker) -> None:
    exporter = harness.exporter(receiver, org="acme", stream="Audit-Trail")
    batch = spans.requests(2)

    report = exporter.export_records(records_of(exporter, batch))

    assert report == DeliveryReport(sent=2, delivered=2, attempts=1)
    (request,) = receiver.wait_for_requests(1)
    assert request.path == "/api/acme/Audit-Trail/_json"
    assert len(receiver.wait_for_records(2, timeout=3, org="acme", stream="audit_trail")) == 2
    assert receiver.records_for("_meta", "audit") == []


def test_export_splits_spans_into_batches_of_batch_size(receiver: FakeOpenObserve, harness: Harness,
                                                        spans: SpanMaker) -> None:
    exporter = harness.exporter(receiver, batch_size=4)
    batch = spans.requests(10)

    assert exporter.export(batch) is SpanExportResult.SUCCESS

    sizes = [len(r.records or []) for r in receiver.wait_for_requests(3)]
    assert sizes == [4, 4, 2]
    assert sorted(event_ids(receiver.records_for())) == sorted(event_ids(records_of(exporter, batch)))


def test_export_of_non_audited_spans_sends_nothing(receiver: FakeOpenObserve, harness: Harness,
                                                   spans: SpanMaker) -> None:
    exporter = harness.exporter(receiver)
    counters = Counters()
    batch = [
        spans.request("GET", "/healthz"),
        spans.request("GET", "/metrics/"),
        spans.request("POST", "/api/acme/logs/_json"),  # OpenObserve ingestion
        spans.request("POST", "/api/acme/_bulk"),
        spans.request("GET", "/api/acme/things/1", kind=SpanKind.INTERNAL),
        spans.request("GET", "/api/acme/things/1", kind=SpanKind.CLIENT),
        spans.span("GET /not-http", attributes={"rpc.system": "grpc"}),  # SERVER but no HTTP method
    ]

    assert exporter.export(batch) is SpanExportResult.SUCCESS
    assert exporter.export([]) is SpanExportResult.SUCCESS

    assert receiver.requests_log == []
    assert counters["captured"] == 0
    assert counters["published"] == 0


# --------------------------------------------------------------------------------------------------
# answers inside HTTP 200
# --------------------------------------------------------------------------------------------------


def test_per_record_failures_are_rejected_not_resent(receiver: FakeOpenObserve, harness: Harness,
                                                     spans: SpanMaker, caplog: pytest.LogCaptureFixture) -> None:
    exporter = harness.exporter(receiver)
    records = records_of(exporter, spans.requests(5))
    counters = Counters()
    receiver.reject_records(2)

    report = exporter.export_records(records)

    assert (report.sent, report.delivered, report.rejected, report.lost) == (5, 3, 2, 0)
    assert report.attempts == 1
    assert not report.ok
    assert len(receiver.wait_for_requests(1)) == 1
    assert len(receiver.ingestion_requests()) == 1, "rejected records must not be re-sent"
    assert event_ids(receiver.records_for()) == event_ids(records[:3])
    assert counters["rejected"] == 2
    assert counters["published"] == 3
    assert counters["lost"] == 0
    warnings = [m for m in otel_messages(caplog, logging.WARNING) if "rejected" in m]
    assert warnings, otel_messages(caplog)
    assert TOO_OLD_ERROR in warnings[0]
    assert "2 of 5" in warnings[0]


def test_mismatched_counts_are_retried_once_then_lost(receiver: FakeOpenObserve, harness: Harness,
                                                      spans: SpanMaker, caplog: pytest.LogCaptureFixture) -> None:
    """Counts that do not add up (a silent server-side drop) are re-sent once, then accounted as lost."""
    exporter = harness.exporter(receiver)
    records = records_of(exporter, spans.requests(5))
    counters = Counters()
    receiver.mismatch_counts(drop=2, times=2)

    report = exporter.export_records(records)

    assert (report.sent, report.delivered, report.rejected, report.lost) == (5, 3, 0, 2)
    assert len(receiver.wait_for_requests(2)) == 2
    assert len(receiver.ingestion_requests()) == 2, "re-sent exactly once, never more"
    assert counters["lost"] == 2
    errors = [m for m in otel_messages(caplog, logging.ERROR) if "LOST" in m]
    assert errors, otel_messages(caplog)
    assert "sent 5" in errors[0]
    assert "successful 3" in errors[0]
    assert "failed 0" in errors[0]


def test_mismatched_counts_then_success_delivers_with_duplicates_only(
        receiver: FakeOpenObserve, harness: Harness, spans: SpanMaker) -> None:
    """The one re-send may store some records twice; event_id identifies them, nothing is lost."""
    exporter = harness.exporter(receiver)
    records = records_of(exporter, spans.requests(5))
    counters = Counters()
    receiver.mismatch_counts(drop=2)

    report = exporter.export_records(records)

    assert report.ok
    assert len(receiver.ingestion_requests()) == 2
    stored = receiver.records_for()
    assert {r["event_id"] for r in stored} == {r["event_id"] for r in records}
    assert len(stored) == 8  # 3 stored by the first answer, all 5 by the second
    assert counters["lost"] == 0


# --------------------------------------------------------------------------------------------------
# retries
# --------------------------------------------------------------------------------------------------


def test_503_then_success_is_retried_and_delivered_once(receiver: FakeOpenObserve, harness: Harness,
                                                        spans: SpanMaker) -> None:
    exporter = harness.exporter(receiver)
    records = records_of(exporter, spans.requests(4))
    counters = Counters()
    receiver.respond_status(503)

    report = exporter.export_records(records)

    assert report.ok
    assert (report.attempts, report.retries, report.delivered) == (2, 1, 4)
    first, second = receiver.wait_for_requests(2)
    assert (first.status, second.status) == (503, 200)
    assert event_ids(first.records or []) == event_ids(second.records or []) == event_ids(records), (
        "a retried batch carries the same event_ids (consumers de-duplicate on them)"
    )
    assert event_ids(receiver.records_for()) == event_ids(records)
    assert counters["retried"] == 4
    assert counters["published"] == 4
    assert counters["lost"] == 0


def test_429_retry_after_is_honoured(receiver: FakeOpenObserve, harness: Harness, spans: SpanMaker) -> None:
    exporter = harness.exporter(receiver, retry_initial_backoff=0.05)
    records = records_of(exporter, spans.requests(2))
    receiver.respond_status(429, retry_after="1")

    report = exporter.export_records(records)

    assert report.ok
    first, second = receiver.wait_for_requests(2)
    assert (first.status, second.status) == (429, 200)
    gap = second.time - first.time
    assert gap >= 1.0, f"Retry-After: 1 not honoured, retried after {gap:.3f}s"
    assert gap < 3.0


@pytest.mark.parametrize("status", [502, 504])
def test_gateway_errors_are_retried(status: int, receiver: FakeOpenObserve, harness: Harness,
                                    spans: SpanMaker) -> None:
    exporter = harness.exporter(receiver)
    records = records_of(exporter, spans.requests(3))
    receiver.respond_status(status, times=2)

    report = exporter.export_records(records)

    assert report.ok
    assert report.attempts == 3
    assert [r.status for r in receiver.wait_for_requests(3)] == [status, status, 200]
    assert event_ids(receiver.records_for()) == event_ids(records)


@pytest.mark.parametrize("status", [400, 401, 403, 404])
def test_client_errors_are_not_retried_and_counted_lost(status: int, receiver: FakeOpenObserve, harness: Harness,
                                                        spans: SpanMaker, caplog: pytest.LogCaptureFixture) -> None:
    exporter = harness.exporter(receiver)
    records = records_of(exporter, spans.requests(3))
    counters = Counters()
    receiver.respond_status(status, times=5)

    report = exporter.export_records(records)

    assert (report.lost, report.delivered, report.attempts) == (3, 0, 1)
    assert len(receiver.wait_for_requests(1)) == 1
    assert len(receiver.ingestion_requests()) == 1, f"HTTP {status} must not be retried"
    assert receiver.records == []
    assert counters["lost"] == 3
    assert counters["retried"] == 0
    errors = [m for m in otel_messages(caplog, logging.ERROR) if "LOST" in m]
    assert errors
    assert f"HTTP {status}" in errors[0]


def test_wrong_password_is_a_real_401_not_retried(receiver: FakeOpenObserve, harness: Harness, spans: SpanMaker,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    exporter = harness.exporter(receiver, password="not-the-password")
    records = records_of(exporter, spans.requests(2))

    report = exporter.export_records(records)

    assert report.lost == 2
    (request,) = receiver.wait_for_requests(1)
    assert request.status == 401
    assert any("HTTP 401" in m and "Unauthorized Access" in m for m in otel_messages(caplog, logging.ERROR))


def test_413_splits_the_batch_until_it_fits(receiver: FakeOpenObserve, harness: Harness, spans: SpanMaker) -> None:
    exporter = harness.exporter(receiver)
    records = records_of(exporter, spans.requests(10))
    receiver.max_records_per_request = 3

    report = exporter.export_records(records)

    assert report.ok
    assert report.delivered == 10
    stored = receiver.wait_for_records(10, timeout=3)
    assert sorted(event_ids(stored)) == sorted(event_ids(records)), "every record exactly once"
    requests = receiver.ingestion_requests()
    assert any(r.status == 413 for r in requests)
    accepted = [r for r in requests if r.status == 200]
    assert all(len(r.records or []) <= 3 for r in accepted)
    assert sum(len(r.records or []) for r in accepted) == 10


def test_413_for_a_single_record_is_rejected_not_retried(receiver: FakeOpenObserve, harness: Harness,
                                                         spans: SpanMaker) -> None:
    exporter = harness.exporter(receiver)
    records = records_of(exporter, spans.requests(1))
    receiver.max_records_per_request = 0

    report = exporter.export_records(records)

    assert (report.rejected, report.lost, report.attempts) == (1, 0, 1)
    assert len(receiver.wait_for_requests(1)) == 1


def test_connection_refused_is_retried_until_the_deadline_then_lost(receiver: FakeOpenObserve, harness: Harness,
                                                                    spans: SpanMaker,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    exporter = harness.exporter(receiver)
    records = records_of(exporter, spans.requests(3))
    receiver.stop()
    counters = Counters()

    started = time.monotonic()
    report = exporter.export_records(records, time.monotonic() + 0.8)
    elapsed = time.monotonic() - started

    assert report.lost == 3
    assert report.attempts >= 3, report
    assert elapsed < 0.8 + 0.5, f"gave up after {elapsed:.2f}s, past the 0.8s deadline"
    assert "ConnectionError" in report.reason
    assert counters["lost"] == 3
    assert any("LOST" in m for m in otel_messages(caplog, logging.ERROR))


def test_receiver_restarted_mid_retry_gets_the_batch(receiver: FakeOpenObserve, harness: Harness,
                                                     spans: SpanMaker, caplog: pytest.LogCaptureFixture) -> None:
    exporter = harness.exporter(receiver, retry_initial_backoff=0.05, retry_max_elapsed=10)
    records = records_of(exporter, spans.requests(3))
    receiver.stop()
    result: Dict[str, DeliveryReport] = {}
    sender = threading.Thread(target=lambda: result.update(report=exporter.export_records(records)))
    sender.start()
    try:
        wait_until(lambda: sum("retrying in" in m for m in otel_messages(caplog)) >= 2, timeout=5,
                   message="two failed attempts against the stopped receiver")
        receiver.start()
    finally:
        sender.join(10)
    assert not sender.is_alive()

    report = result["report"]
    assert report.ok, report
    assert report.attempts >= 3
    assert event_ids(receiver.wait_for_records(3, timeout=3)) == event_ids(records)
    assert len(receiver.ingestion_requests()) == 1


def test_hang_past_timeout_is_retried(receiver: FakeOpenObserve, harness: Harness, spans: SpanMaker) -> None:
    exporter = harness.exporter(receiver, timeout=0.5)
    records = records_of(exporter, spans.requests(2))
    receiver.hang(30)  # parked until the receiver stops at teardown; never answered

    started = time.monotonic()
    report = exporter.export_records(records)
    elapsed = time.monotonic() - started

    assert report.ok, report
    assert (report.attempts, report.retries) == (2, 1)
    assert 0.5 <= elapsed < 3.0
    first, second = receiver.wait_for_requests(2)
    assert first.state == "hanging"
    assert second.status == 200
    assert event_ids(receiver.records_for()) == event_ids(records)


class _Redirector:
    """A loopback server answering every POST with 307 to ``location`` (it records what it got)."""

    def __init__(self, location: str) -> None:
        seen: List[Dict[str, str]] = []
        self.seen = seen

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", "0")))
                seen.append({k.lower(): v for k, v in self.headers.items()})
                self.send_response(307)
                self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def test_redirects_are_not_followed(receiver: FakeOpenObserve, harness: Harness, spans: SpanMaker,
                                    caplog: pytest.LogCaptureFixture) -> None:
    redirector = _Redirector(receiver.ingest_url())
    try:
        exporter = harness.exporter(receiver, endpoint=redirector.url)
        records = records_of(exporter, spans.requests(2))

        report = exporter.export_records(records)
    finally:
        redirector.close()

    assert report.lost == 2
    assert report.attempts == 1
    assert len(redirector.seen) == 1
    assert receiver.requests_log == [], "the redirect (and the credentials) must not be followed"
    assert any("307" in m for m in otel_messages(caplog, logging.ERROR))


# --------------------------------------------------------------------------------------------------
# shutdown
# --------------------------------------------------------------------------------------------------


def test_shutdown_interrupts_a_backoff_promptly(receiver: FakeOpenObserve, harness: Harness, spans: SpanMaker,
                                                caplog: pytest.LogCaptureFixture) -> None:
    exporter = harness.exporter(receiver, retry_initial_backoff=20, retry_max_elapsed=120)
    records = records_of(exporter, spans.requests(3))
    receiver.respond_status(503, times=1000)
    counters = Counters()
    result: Dict[str, DeliveryReport] = {}
    sender = threading.Thread(target=lambda: result.update(report=exporter.export_records(records)))
    sender.start()
    started = time.monotonic()
    try:
        receiver.wait_for_requests(1, timeout=3)
        wait_until(lambda: any("retrying in" in m for m in otel_messages(caplog)), timeout=3,
                   message="the exporter to enter its backoff")
        started = time.monotonic()
        exporter.shutdown()
    finally:
        sender.join(5)
    elapsed = time.monotonic() - started

    assert not sender.is_alive()
    assert elapsed < 1.0, f"shutdown took {elapsed:.2f}s to interrupt a 20s backoff"
    report = result["report"]
    assert (report.lost, report.delivered) == (3, 0)
    assert "shut down" in report.reason
    assert counters["lost"] == 3
    assert len(receiver.ingestion_requests()) == 1


def test_export_after_shutdown_fails_and_counts_the_records_lost(receiver: FakeOpenObserve, harness: Harness,
                                                                 spans: SpanMaker) -> None:
    # exporter.shutdown() promises: "later exports fail and count their records as lost".
    exporter = harness.exporter(receiver)
    exporter.shutdown()
    counters = Counters()

    result = exporter.export(spans.requests(3))

    assert result is SpanExportResult.FAILURE
    assert receiver.requests_log == []
    assert counters["lost"] == 3, f"3 audit records handed to a shut-down exporter vanished: {counters.delta()}"


def test_shutdown_timeout_millis_is_positional_or_keyword(receiver: FakeOpenObserve, harness: Harness,
                                                          spans: SpanMaker) -> None:
    for method in (harness.exporter(receiver).shutdown, O2AuditSpanProcessor.shutdown):
        parameter = inspect.signature(method).parameters["timeout_millis"]
        assert parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD

    positional = harness.exporter(receiver)
    positional.shutdown(100)
    keyword = harness.exporter(receiver)
    keyword.shutdown(timeout_millis=100)
    for exporter in (positional, keyword):
        assert exporter.export(spans.requests(1)) is SpanExportResult.FAILURE

    # The SDK passes timeout_millis= to exporters whose parameter allows it.
    wrapped = harness.exporter(receiver)
    bsp = BatchSpanProcessor(wrapped, schedule_delay_millis=60_000)
    bsp.shutdown()
    assert wrapped.export(spans.requests(1)) is SpanExportResult.FAILURE

    _, processor = harness.processor(receiver)
    processor.shutdown(timeout_millis=500)
    assert processor.is_shut_down
    _, processor2 = harness.processor(receiver)
    processor2.shutdown(500)
    assert processor2.is_shut_down
    assert receiver.requests_log == []


# --------------------------------------------------------------------------------------------------
# file sink
# --------------------------------------------------------------------------------------------------


def test_file_sink_appends_json_lines(tmp_path: Any, harness: Harness, spans: SpanMaker) -> None:
    path = tmp_path / "audit" / "audit.jsonl"
    exporter = harness.exporter(endpoint=f"file://{path}")
    first, second = spans.requests(2, prefix="/api/acme/first"), spans.requests(3, prefix="/api/acme/second")

    assert exporter.export(first) is SpanExportResult.SUCCESS
    lines_after_first = path.read_text("utf-8").splitlines()
    assert exporter.export(second) is SpanExportResult.SUCCESS
    lines = path.read_text("utf-8").splitlines()

    assert len(lines_after_first) == 2
    assert lines[:2] == lines_after_first, "the second export must append, not rewrite"
    assert len(lines) == 5
    parsed = [json.loads(line) for line in lines]
    for record in parsed:
        assert set(record) >= CORE_KEYS
    assert [r["http_path"] for r in parsed] == [
        "/api/acme/first/0", "/api/acme/first/1", "/api/acme/second/0", "/api/acme/second/1", "/api/acme/second/2",
    ]
    assert event_ids(parsed) == event_ids(records_of(exporter, [*first, *second]))


# --------------------------------------------------------------------------------------------------
# records whose text cannot be encoded must not take the batch down with them
# --------------------------------------------------------------------------------------------------


def _poisoned_batch(spans: SpanMaker) -> List[Any]:
    # The contrib ASGI instrumentation decodes a header that is not UTF-8 with "unicode_escape", so a
    # client sending  User-Agent: \xff\ud800  yields a lone surrogate in http.user_agent (see
    # test_fastapi_inprocess.py for the same thing through a real FastAPI app).
    bad = spans.request(path="/api/acme/things/666", **{"http.user_agent": b"\xff\\ud800".decode("unicode_escape")})
    good = spans.requests(2)
    return [good[0], bad, good[1]]


def test_http_one_unencodable_record_does_not_lose_the_batch(receiver: FakeOpenObserve, harness: Harness,
                                                             spans: SpanMaker) -> None:
    exporter = harness.exporter(receiver)
    batch = _poisoned_batch(spans)
    good_ids = event_ids(records_of(exporter, [batch[0], batch[2]]))
    counters = Counters()

    exporter.export(batch)

    stored = event_ids(receiver.records_for())
    assert set(good_ids) <= set(stored), (
        f"one record with a lone surrogate cost the whole batch: stats {counters.delta()}"
    )


def test_file_one_unencodable_record_does_not_lose_the_batch(tmp_path: Any, harness: Harness,
                                                             spans: SpanMaker) -> None:
    path = tmp_path / "audit.jsonl"
    exporter = harness.exporter(endpoint=f"file://{path}")
    batch = _poisoned_batch(spans)
    good_ids = event_ids(records_of(exporter, [batch[0], batch[2]]))
    counters = Counters()

    try:
        exporter.export(batch)
    except UnicodeError as exc:  # the Sink contract: send() never raises
        pytest.fail(f"FileSink.send raised {exc!r}; the batch is lost and never counted")

    text = path.read_text("utf-8") if path.exists() else ""
    written = [json.loads(line) for line in text.split("\n") if line.strip()]
    assert set(good_ids) <= set(event_ids(written))
    delta = counters.delta()
    assert delta["published"] + delta["rejected"] + delta["lost"] == 3, delta


# --------------------------------------------------------------------------------------------------
# secrets
# --------------------------------------------------------------------------------------------------


def test_password_never_logged_nor_in_reprs(receiver: FakeOpenObserve, harness: Harness, spans: SpanMaker,
                                            caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="urllib3")
    token = base64.b64encode(f"{receiver.user}:{PASSWORD}".encode()).decode("ascii")
    exporter = harness.exporter(receiver, retry_max_elapsed=2)
    _, processor = harness.processor(receiver)

    # Success, retries, refusals, server error texts, a dead server: every path that logs.
    exporter.export(spans.requests(2))
    receiver.respond_status(503)
    exporter.export(spans.requests(1))
    receiver.respond_status(401)
    exporter.export(spans.requests(1))
    receiver.reject_records(1)
    exporter.export(spans.requests(2))
    receiver.mismatch_counts(1)
    exporter.export(spans.requests(2))
    receiver.max_records_per_request = 1
    exporter.export(spans.requests(2))
    receiver.max_records_per_request = None
    wrong = harness.exporter(receiver, password=PASSWORD + "-wrong")
    wrong.export(spans.requests(1))
    receiver.stop()
    exporter.export_records(records_of(exporter, spans.requests(1)), time.monotonic() + 0.3)
    with pytest.raises(ConfigError) as excinfo:
        O2AuditConfig.from_env({}, endpoint=f"http://admin:{PASSWORD}@127.0.0.1:1")
    logging.getLogger("otel_o2audit").info("config error was: %s", excinfo.value)

    assert any(r.name.startswith("urllib3") for r in caplog.records), "urllib3 debug logs were not captured"
    assert any(r.name == "otel_o2audit" for r in caplog.records)
    for record in caplog.records:
        text = " ".join([record.getMessage(), repr(record.args), record.exc_text or "", str(record.exc_info)])
        assert PASSWORD not in text, f"password in a {record.name} log record: {text[:300]}"
        assert token not in text, f"credentials in a {record.name} log record: {text[:300]}"
    assert PASSWORD not in caplog.text
    assert token not in caplog.text
    for shown in (repr(exporter), str(exporter), repr(processor), str(processor), repr(processor.exporter),
                  repr(exporter.config), str(exporter.config.describe()), repr(wrong), str(excinfo.value)):
        assert PASSWORD not in shown, shown
        assert token not in shown, shown
