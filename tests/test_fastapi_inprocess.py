"""Real FastAPI apps in process (TestClient), with the contrib instrumentation AND FastAPI's native telemetry.

Each test builds its own SDK TracerProvider and audit processor. FastAPI's native telemetry is pointed at that
provider with ``FastAPI(telemetry={"tracer_provider": provider})``, so no global provider is needed in this
process; the semantic-convention cases (read once per process by the instrumentation) and the global-provider
case run in subprocesses that write JSON lines.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any, Dict, List, Optional

import pytest
from fastapi.testclient import TestClient
from inproc import (
    CORE_KEYS,
    SERVICE_NAME,
    Counters,
    Harness,
    make_app,
    raw_asgi_get,
    server_spans,
)
from o2receiver import FakeOpenObserve
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from otel_o2audit import REDACTED, O2AuditSpanProcessor

CONTRIB_SCOPE = "opentelemetry.instrumentation.fastapi"


class Stack:
    """Provider (+ in-memory copy of sampled spans) + audit processor + FastAPI app, for one test."""

    def __init__(self, harness: Harness, receiver: FakeOpenObserve, settings: Optional[Dict[str, Any]] = None,
                 **app_options: Any) -> None:
        self.memory = InMemorySpanExporter()
        self.provider: TracerProvider = harness.provider(memory=self.memory)
        self.processor: O2AuditSpanProcessor
        _, self.processor = harness.processor(receiver, self.provider, **(settings or {}))
        self.app = make_app(self.provider, **app_options)
        self.receiver = receiver

    def records(self, expected: int) -> List[Dict[str, Any]]:
        assert self.processor.force_flush(5000) is True
        records = self.receiver.records_for()
        assert len(records) == expected, [r["http_path"] for r in records]
        return records


@pytest.fixture
def stack(harness: Harness, receiver: FakeOpenObserve) -> Stack:
    return Stack(harness, receiver)


# --------------------------------------------------------------------------------------------------
# one record per request
# --------------------------------------------------------------------------------------------------


def test_one_record_per_request_with_native_and_contrib(stack: Stack) -> None:
    with TestClient(stack.app) as client:
        for i in range(3):
            assert client.get(f"/api/acme/things/{i}", headers={"User-Agent": "ua/1"}).status_code == 200

    records = stack.records(3)
    assert [r["http_path"] for r in records] == [f"/api/acme/things/{i}" for i in range(3)]
    record = records[0]
    assert set(record) >= CORE_KEYS
    assert record["http_route"] == "/api/{org_id}/things/{tid}"
    assert record["http_method"] == "GET"
    assert record["http_response_code"] == 200
    assert record["protocol"] == "http"
    assert record["user_agent"] == "ua/1"
    assert record["client_ip"] == "testclient"
    assert record["service_name"] == SERVICE_NAME
    assert record["read_only"] is True
    assert "error_msg" not in record
    assert len(record["trace_id"]) == 32
    assert len(record["span_id"]) == 16
    assert isinstance(record["event_id"], str)
    assert record["event_id"]
    assert len({r["event_id"] for r in records}) == 3


def test_mounted_sub_application_gives_one_record_with_the_full_route(stack: Stack) -> None:
    with TestClient(stack.app) as client:
        for tid in (42, 43):
            assert client.get(f"/sub/things/{tid}").json()["tid"] == tid

    spans = server_spans(stack.memory)
    scopes = sorted(s.instrumentation_scope.name for s in spans)
    assert scopes == ["fastapi", "fastapi", CONTRIB_SCOPE, CONTRIB_SCOPE], (
        "each request makes two SERVER spans: the contrib one and the sub-application's native one"
    )
    records = stack.records(2)
    assert [r["http_route"] for r in records] == ["/sub/things/{tid}", "/sub/things/{tid}"]
    assert [r["http_path"] for r in records] == ["/sub/things/42", "/sub/things/43"]
    contrib_traces = {f"{s.context.trace_id:032x}" for s in spans if s.instrumentation_scope.name == CONTRIB_SCOPE}
    assert {r["trace_id"] for r in records} == contrib_traces


def test_native_telemetry_alone_gives_one_record_per_request(harness: Harness, receiver: FakeOpenObserve) -> None:
    stack = Stack(harness, receiver, contrib=False)
    with TestClient(stack.app) as client:
        assert client.get("/api/acme/things/5").status_code == 200
        assert client.get("/sub/things/6").status_code == 200

    assert {s.instrumentation_scope.name for s in server_spans(stack.memory)} == {"fastapi"}
    records = stack.records(2)
    assert [r["http_route"] for r in records] == ["/api/{org_id}/things/{tid}", "/sub/things/{tid}"]
    assert [r["org_id"] for r in records] == ["acme", ""]


# --------------------------------------------------------------------------------------------------
# identity, failures, redaction, organization
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/me/sync", "/me/async", "/sub/things/1"])
def test_set_user_from_a_dependency(path: str, stack: Stack) -> None:
    with TestClient(stack.app) as client:
        assert client.get(path, headers={"X-User": "alice@example.com"}).status_code == 200
        assert client.get(path).status_code == 200  # anonymous

    alice, anonymous = stack.records(2)
    assert alice["user_email"] == "alice@example.com"
    assert anonymous["user_email"] == ""


def test_client_and_server_errors_are_audited(stack: Stack) -> None:
    with TestClient(stack.app, raise_server_exceptions=False) as client:
        assert client.get("/no/such/route").status_code == 404
        assert client.get("/forbidden").status_code == 403
        assert client.post("/api/acme/things", content=b"not json",
                           headers={"Content-Type": "application/json"}).status_code == 422
        assert client.get("/boom").status_code == 500
        assert client.get("/unavailable").status_code == 503

    missing, forbidden, invalid, boom, unavailable = stack.records(5)
    assert missing["http_response_code"] == 404
    assert "http_route" not in missing
    assert "error_msg" not in missing
    assert (forbidden["http_response_code"], "error_msg" in forbidden) == (403, False)
    assert (invalid["http_response_code"], "error_msg" in invalid) == (422, False)
    assert invalid["http_method"] == "POST"
    assert invalid["read_only"] is False
    assert boom["http_response_code"] == 500
    assert boom["error_msg"] == "RuntimeError: kaboom in the handler"
    assert unavailable["http_response_code"] == 503
    assert unavailable["error_msg"]


def test_query_secrets_are_redacted(stack: Stack) -> None:
    with TestClient(stack.app) as client:
        client.get("/search?token=abc123&page=2&api_key=k-1&author=alice&clientSecret=s&sort=asc")

    (record,) = stack.records(1)
    assert record["http_query_params"] == (
        f"token={REDACTED}&page=2&api_key={REDACTED}&author=alice&clientSecret={REDACTED}&sort=asc"
    )
    assert "abc123" not in json.dumps(record)


def test_query_after_an_encoded_hash_is_not_dropped(stack: Stack) -> None:
    # ?note=%23&delete=all : under the default (old) HTTP semantic conventions the query is only in
    # http.url, which the instrumentation builds UNQUOTED ("...?note=#&delete=all"); the record must
    # still show every parameter the client sent, not stop at the '#'.
    with TestClient(stack.app) as client:
        client.get("/search?note=%23&delete=all&token=t0k")

    (record,) = stack.records(1)
    assert "delete=all" in record["http_query_params"], record["http_query_params"]
    assert f"token={REDACTED}" in record["http_query_params"], record["http_query_params"]


def test_org_id_from_the_org_id_path_parameter(stack: Stack) -> None:
    with TestClient(stack.app) as client:
        client.get("/orgs/acme-corp/items")
        client.get("/api/globex/things/1")
        client.get("/search")

    by_route, by_convention, none = stack.records(3)
    assert by_route["http_route"] == "/orgs/{org_id}/items"
    assert by_route["org_id"] == "acme-corp"
    assert by_convention["org_id"] == "globex"
    assert none["org_id"] == ""


def test_health_and_ingestion_requests_are_not_audited(stack: Stack) -> None:
    counters = Counters()
    with TestClient(stack.app) as client:
        client.get("/healthz")
        client.get("/healthz/", follow_redirects=False)  # Starlette answers 307; still a health probe
        client.post("/api/acme/logs/_json", json=[{"a": 1}])
        client.get("/api/acme/things/1")

    (record,) = stack.records(1)
    assert record["http_path"] == "/api/acme/things/1"
    assert counters["skipped"] == 3


@pytest.mark.parametrize("sink", ["http", "file", "spool"])
def test_a_hostile_user_agent_does_not_cost_other_requests_their_records(
    sink: str, harness: Harness, receiver: FakeOpenObserve, tmp_path: Any
) -> None:
    # A header that is not UTF-8 is decoded by the ASGI instrumentation with "unicode_escape": the bytes
    # b"\xff\\ud800" become "\xff\ud800", a lone surrogate that cannot be encoded as UTF-8 JSON. TestClient
    # re-encodes headers, so this request goes straight into the ASGI app, as an ASGI server would send it.
    path = tmp_path / "audit.jsonl"
    settings: Dict[str, Any] = {
        "http": {},
        "file": {"endpoint": f"file://{path}"},
        "spool": {"spool_dir": str(tmp_path / "spool")},  # O2_AUDIT_SPOOL_DIR: records are written to disk first
    }[sink]
    stack = Stack(harness, receiver, settings)
    counters = Counters()
    with TestClient(stack.app) as client:
        assert client.get("/api/acme/things/1").status_code == 200
    assert raw_asgi_get(stack.app, "/api/evil/things/2", [(b"user-agent", b"\xff\\ud800")]) == 200
    with TestClient(stack.app) as client:
        assert client.get("/api/acme/things/3").status_code == 200

    flushed = stack.processor.force_flush(5000)

    if sink == "file":
        text = path.read_text("utf-8") if path.exists() else ""
        stored = [json.loads(line) for line in text.split("\n") if line.strip()]
    else:
        stored = stack.receiver.records_for()
    paths = [r["http_path"] for r in stored]
    delta = counters.delta()
    assert flushed is (len(stored) == 3), f"force_flush said {flushed} but stored {paths}; stats {delta}"
    assert delta["published"] + delta["rejected"] + delta["lost"] == delta["captured"] == 3, (
        f"records vanished without being counted: {delta}"
    )
    assert {"/api/acme/things/1", "/api/acme/things/3"} <= set(paths), (
        f"one crafted User-Agent made the whole batch undeliverable: stored {paths}, stats {delta}"
    )


# --------------------------------------------------------------------------------------------------
# semantic-convention modes and the global provider, in subprocesses
# --------------------------------------------------------------------------------------------------

_SEMCONV_APP = textwrap.dedent(
    """
    import json
    import sys
    from typing import Optional

    from fastapi import Depends, FastAPI, Header
    from fastapi.testclient import TestClient
    from opentelemetry import trace
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    import otel_o2audit

    out = sys.argv[1]
    provider = TracerProvider(resource=Resource.create({"service.name": "semconv-app"}))
    trace.set_tracer_provider(provider)  # global: FastAPI's native telemetry finds it by itself
    processor = otel_o2audit.install(provider, endpoint="file://" + out, batch_size=1000, publish_interval=60)


    def user(x_user: Optional[str] = Header(default=None)) -> Optional[str]:
        if x_user:
            otel_o2audit.set_user(x_user)
        return x_user


    app = FastAPI()
    sub = FastAPI()


    @app.get("/api/{org_id}/things/{tid}")
    def thing(org_id: str, tid: int, who: Optional[str] = Depends(user)):
        return {"tid": tid}


    @app.post("/api/{org_id}/things")
    def create(org_id: str, payload: dict):
        return payload


    @app.get("/orgs/{org_id}/items")
    def items(org_id: str):
        return []


    @app.post("/api/{org}/{stream}/_json")
    def ingest(org: str, stream: str):
        return {}


    @app.get("/healthz")
    def health():
        return {}


    @app.get("/boom")
    def boom():
        raise RuntimeError("kaboom")


    @sub.get("/things/{tid}")
    def sub_thing(tid: int, who: Optional[str] = Depends(user)):
        return {"tid": tid}


    app.mount("/sub", sub)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)

    with TestClient(app, raise_server_exceptions=False) as client:
        client.get("/api/acme/things/7?token=abc&page=2", headers={"User-Agent": "semconv/1", "X-User": "bob"})
        client.post("/api/acme/things", json={"a": 1})
        client.get("/sub/things/42?sort=asc", headers={"X-User": "carol"})
        client.get("/orgs/o1/items")
        client.get("/boom")
        client.get("/no/such/route")
        client.get("/healthz")
        client.post("/api/acme/logs/_json", json=[{"a": 1}])

    flushed = processor.force_flush(10000)
    provider.shutdown()
    sys.exit(0 if flushed else 3)
    """
)

_VOLATILE = ("_timestamp", "trace_id", "span_id", "event_id", "duration_ms")


def _run_modes(workdir: Any, modes: Dict[str, str]) -> Dict[str, List[Dict[str, Any]]]:
    script = workdir / "semconv_app.py"
    script.write_text(_SEMCONV_APP)
    procs = {}
    for name, value in modes.items():
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("O2_AUDIT_", "OTEL_")) and k != "FASTAPI_OTEL_AUTO_CONFIGURE"}
        if value:
            env["OTEL_SEMCONV_STABILITY_OPT_IN"] = value
        out = workdir / f"{name}.jsonl"
        procs[name] = (out, subprocess.Popen([sys.executable, str(script), str(out)], env=env,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for name, (out, proc) in procs.items():
        try:
            _, stderr = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{stderr[-3000:]}"
        results[name] = [json.loads(line) for line in out.read_text("utf-8").split("\n") if line.strip()]
    return results


@pytest.fixture(scope="module")
def semconv_records(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, List[Dict[str, Any]]]:
    """The records of the same requests under the three HTTP semconv modes (one subprocess each)."""
    return _run_modes(tmp_path_factory.mktemp("semconv"), {"default": "", "stable": "http", "dup": "http/dup"})


def _stable_part(record: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in record.items() if k not in _VOLATILE}


@pytest.mark.parametrize("mode", ["default", "stable", "dup"])
def test_semconv_mode_records(mode: str, semconv_records: Dict[str, List[Dict[str, Any]]]) -> None:
    # Publish order is not capture order (a request with a nested SERVER span waits for it): sort by time.
    records = sorted(semconv_records[mode], key=lambda r: r["_timestamp"])
    paths = [r["http_path"] for r in records]
    assert paths == ["/api/acme/things/7", "/api/acme/things", "/sub/things/42", "/orgs/o1/items", "/boom",
                     "/no/such/route"], "exactly one record per audited request"
    thing, create, sub, items, boom, missing = records
    assert set(thing) >= CORE_KEYS
    assert thing["http_query_params"] == f"token={REDACTED}&page=2"
    assert thing["user_email"] == "bob"
    assert thing["user_agent"] == "semconv/1"
    assert thing["client_ip"] == "testclient"
    assert thing["http_route"] == "/api/{org_id}/things/{tid}"
    assert thing["org_id"] == "acme"
    assert (create["http_method"], create["read_only"], create["http_response_code"]) == ("POST", False, 200)
    assert sub["user_email"] == "carol"
    assert sub["http_query_params"] == "sort=asc"
    assert items["org_id"] == "o1"
    assert (boom["http_response_code"], boom["error_msg"]) == (500, "RuntimeError: kaboom")
    assert missing["http_response_code"] == 404
    assert "http_route" not in missing
    assert "error_msg" not in missing
    assert all(r["service_name"] == "semconv-app" for r in records)


def test_stable_and_dup_semconv_produce_the_same_records(semconv_records: Dict[str, List[Dict[str, Any]]]) -> None:
    stable = [_stable_part(r) for r in semconv_records["stable"]]
    assert [_stable_part(r) for r in semconv_records["dup"]] == stable
    assert [_stable_part(r) for r in semconv_records["default"]] == stable


def test_global_provider_mounted_sub_app_gives_one_record_with_the_full_route(
    semconv_records: Dict[str, List[Dict[str, Any]]],
) -> None:
    # The subprocesses set the GLOBAL provider, so FastAPI's native telemetry of the mounted sub-application
    # traces by itself next to the contrib middleware of the outer app: still one record, full route.
    routes = {}
    for mode, records in semconv_records.items():
        (sub,) = [r for r in records if r["http_path"] == "/sub/things/42"]
        routes[mode] = sub.get("http_route")
    assert routes == dict.fromkeys(semconv_records, "/sub/things/{tid}")
