"""Zero-code setup, end to end: ``opentelemetry-instrument uvicorn`` with only environment variables.

Every test starts a real server subprocess (tests/apps/audit_app.py, an app with no OpenTelemetry code),
drives it with ``requests`` and looks at what reached the sink: the FakeOpenObserve receiver
(tests/o2receiver.py) for the end-to-end contract, a ``file://`` JSON-lines sink where only the pipeline
matters. Servers are stopped with the real signal; every wait is a condition with a deadline.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import pytest
from o2receiver import FakeOpenObserve
from procs import AppProcess, Launcher, child_env, free_port, read_jsonl, wait_until

SERVICE = "zero-code-audit-test"
SECRET = "distinctive-secret-value"
THREAD_PREFIX = "otel-o2audit"  # the audit processor's worker thread(s): "otel-o2audit", "otel-o2audit-..."
ABSENT = object()  # expected http_route: the key must be absent
ANY = object()  # expected http_route: not checked

HEX32 = re.compile(r"[0-9a-f]{32}")
HEX16 = re.compile(r"[0-9a-f]{16}")
KEY = re.compile(r"[a-z0-9_]+")
STRING_KEYS = ("user_email", "org_id", "protocol", "http_method", "http_path", "http_query_params", "http_body",
               "trace_id", "event_id", "span_id")
OPTIONAL_STRING_KEYS = ("error_msg", "http_route", "client_ip", "user_agent", "service_name")


@dataclass(frozen=True)
class Call:
    """One request to the test app and what its audit record must say (``audited=False``: no record)."""

    method: str
    path: str
    status: int
    json: Any = None
    query: str = ""
    audited: bool = True
    route: Any = ANY
    org: str = ""
    query_recorded: str = ""
    error_contains: Tuple[str, ...] = field(default=())

    @property
    def key(self) -> Tuple[str, str, int]:
        return (self.method, self.path, self.status)


HEALTH = Call("GET", "/healthz", 200, audited=False)
METRICS = Call("GET", "/metrics", 404, audited=False)  # excluded by default even though the app has no route
INGEST_JSON = Call("POST", "/api/acme/app_logs/_json", 200, json=[{"msg": "a"}, {"msg": "b"}], audited=False)
INGEST_OTLP = Call("POST", "/api/acme/v1/logs", 404, json={}, audited=False)  # ingestion pattern, no app route

LOGIN = Call("POST", "/auth/login", 200, json={"email": "alice@example.com", "password": "pw"},
             route="/auth/login")
LIST = Call("GET", "/api/acme/dashboards", 200, query="page=2&token=secret-token-value",
            route="/api/{org_id}/dashboards", org="acme", query_recorded="page=2&token=[REDACTED]")
CREATE = Call("POST", "/api/acme/dashboards", 201, json={"title": "ops"}, route="/api/{org_id}/dashboards",
              org="acme")
GET_MISSING = Call("GET", "/api/acme/dashboards/999", 404, route="/api/{org_id}/dashboards/{dashboard_id}",
                   org="acme")
NO_ROUTE = Call("GET", "/no/such/route", 404, route=ABSENT)
BROKEN = Call("GET", "/api/acme/reports/broken", 500, route="/api/{org_id}/reports/broken", org="acme",
              error_contains=("RuntimeError", "report renderer crashed for org acme"))
FORBIDDEN = Call("DELETE", "/api/acme/settings", 403, route="/api/{org_id}/settings", org="acme")
NOT_ALLOWED = Call("PUT", "/api/acme/dashboards", 405, org="acme")
WHOAMI = Call("GET", "/api/globex/whoami", 200, route="/api/{org_id}/whoami", org="globex")
THREADS = Call("GET", "/debug/threads", 200, route="/debug/threads")  # AppProcess.threads(): audited too
GET_ONE = Call("GET", "/api/acme/dashboards/1", 200, route="/api/{org_id}/dashboards/{dashboard_id}", org="acme")

#: 10 audited requests (after CREATE, dashboard 1 exists) mixed with probes and ingestion.
MIX: Tuple[Call, ...] = (
    HEALTH, LOGIN, LIST, INGEST_JSON, CREATE, GET_ONE, METRICS, GET_MISSING, NO_ROUTE, INGEST_OTLP, BROKEN,
    FORBIDDEN, HEALTH, NOT_ALLOWED, WHOAMI,
)


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    pool = Launcher(tmp_path)
    try:
        yield pool
    finally:
        pool.cleanup()


@pytest.fixture
def o2() -> Iterator[FakeOpenObserve]:
    fake = FakeOpenObserve().start()
    try:
        yield fake
    finally:
        fake.stop()
    assert fake.server_errors == []


def env_for(overrides: Mapping[str, Optional[str]]) -> Dict[str, str]:
    return child_env({"OTEL_SERVICE_NAME": SERVICE, **overrides})


def receiver_vars(o2: FakeOpenObserve, **extra: str) -> Dict[str, str]:
    return {"O2_AUDIT_ENABLED": "true", "O2_AUDIT_ENDPOINT": o2.url, "O2_AUDIT_USER": o2.user,
            "O2_AUDIT_PASSWORD": o2.password, **extra}


def file_vars(path: Path, **extra: str) -> Dict[str, str]:
    return {"O2_AUDIT_ENABLED": "true", "O2_AUDIT_ENDPOINT": f"file://{path}", **extra}


# ------------------------------------------------------------------------------------------------ helpers
def drive(app: AppProcess, calls: Sequence[Call]) -> List[Call]:
    """Send ``calls`` in order, each on a new connection; return the audited ones.

    (uvicorn closes the connection after an unhandled exception's 500, so keep-alive reuse could race.)
    """
    for call in calls:
        url_path = f"{call.path}?{call.query}" if call.query else call.path
        response = app.fresh_request(call.method, url_path, json=call.json)
        assert response.status_code == call.status, (
            f"{call.method} {url_path} -> {response.status_code}, expected {call.status}{app.tail()}")
    return [c for c in calls if c.audited]


def check_types(record: Mapping[str, Any]) -> None:
    """The value types audit-record.md fixes (and no nulls, canonical keys)."""
    for key, value in record.items():
        assert KEY.fullmatch(key), f"non-canonical key {key!r} in {record}"
        assert value is not None, f"{key} is null in {record}"
    assert type(record["_timestamp"]) is int, record
    assert type(record["http_response_code"]) is int, record
    assert type(record["read_only"]) is bool, record
    assert type(record["duration_ms"]) is float, record
    assert record["duration_ms"] >= 0, record
    for key in STRING_KEYS:
        assert type(record[key]) is str, f"{key} is not a string in {record}"
    for key in OPTIONAL_STRING_KEYS:
        if key in record:
            assert type(record[key]) is str, f"{key} is not a string in {record}"
    assert record["protocol"] == "http"
    assert record["http_body"] == ""
    assert HEX32.fullmatch(record["trace_id"]), record
    assert HEX16.fullmatch(record["span_id"]), record
    assert record["event_id"], record


def check_records(records: Sequence[Mapping[str, Any]], calls: Sequence[Call], context: str = "",
                  window: Optional[Tuple[float, float]] = None) -> None:
    """Exactly one record per audited call, each saying what the call did."""
    got = Counter((r.get("http_method"), r.get("http_path"), r.get("http_response_code")) for r in records)
    want = Counter(c.key for c in calls)
    assert got == want, f"records do not match the audited requests:\n got {got}\nwant {want}{context}"
    event_ids = [r["event_id"] for r in records]
    assert len(set(event_ids)) == len(event_ids), f"duplicate event_id in {event_ids}{context}"
    by_key = {(r["http_method"], r["http_path"], r["http_response_code"]): r for r in records}
    for call in calls:
        record = by_key[call.key]
        check_types(record)
        assert record["read_only"] is (call.method in ("GET", "HEAD", "OPTIONS")), record
        assert record["org_id"] == call.org, record
        assert record["http_query_params"] == call.query_recorded, record
        assert record["service_name"] == SERVICE, record
        assert record["client_ip"] == "127.0.0.1", record
        assert record["user_agent"].startswith("python-requests/"), record
        if call.route is ABSENT:
            assert "http_route" not in record, record
        elif call.route is not ANY:
            assert record.get("http_route") == call.route, record
        if call.status >= 500:
            assert all(part in record.get("error_msg", "") for part in call.error_contains), record
        else:
            assert "error_msg" not in record, record
        if window is not None:
            start_us, end_us = int(window[0] * 1e6), int(window[1] * 1e6)
            assert start_us <= record["_timestamp"] <= end_us, (record["_timestamp"], window)
    for record in records:
        assert "secret-token-value" not in repr(record), record


def raw_records(o2: FakeOpenObserve) -> List[Dict[str, Any]]:
    """Every record as the exporter sent it (before the receiver's normalization), in arrival order."""
    out: List[Dict[str, Any]] = []
    for request in o2.ingestion_requests():
        assert request.status == 200, request.summary()
        assert request.records is not None, request.summary()
        out.extend(request.records)
    return out


def batch_sizes(o2: FakeOpenObserve) -> List[int]:
    return [len(r.records or []) for r in o2.ingestion_requests()]


def server_spans_in(text: str) -> int:
    return text.count('"kind": "SpanKind.SERVER"')


def audit_threads(names: Sequence[str]) -> List[str]:
    return [name for name in names if name.startswith(THREAD_PREFIX)]


def assert_not_installed(app: AppProcess) -> None:
    names = app.threads()
    assert not audit_threads(names), f"audit worker thread running: {names}{app.tail()}"


# ------------------------------------------------------------------------------------------------ done when
@pytest.mark.parametrize("user_exporter", ["none", "console"])
def test_end_to_end_batches_of_batch_size_then_rest_on_sigterm(
    launcher: Launcher, o2: FakeOpenObserve, user_exporter: str
) -> None:
    """10 audited requests among probes and ingestion, O2_AUDIT_BATCH_SIZE=4: publishes of 4 and 4 while the
    app runs, the remaining 2 on SIGTERM; one correctly typed record per audited request. With
    OTEL_TRACES_EXPORTER=console the user's own exporter keeps printing spans."""
    overrides: Dict[str, Optional[str]] = {
        **receiver_vars(o2, O2_AUDIT_BATCH_SIZE="4", O2_AUDIT_PUBLISH_INTERVAL="600"),
        "OTEL_TRACES_EXPORTER": user_exporter,
    }
    if user_exporter == "console":
        overrides["OTEL_BSP_SCHEDULE_DELAY"] = "100"
    app = launcher.uvicorn(env_for(overrides)).wait_ready()
    started = time.time()
    audited = drive(app, MIX)
    finished = time.time()
    assert len(audited) == 10

    o2.wait_for_requests(2, timeout=15)
    assert batch_sizes(o2) == [4, 4], f"{batch_sizes(o2)}{app.tail()}"
    if user_exporter == "console":
        # The user's exporter still works next to the audit processor: its spans reach stdout.
        wait_until(lambda: server_spans_in(app.stdout()) >= len(MIX), 15,
                   lambda: f"console exporter output of {len(MIX)} server spans{app.tail()}")
        assert '"name": "GET /api/{org_id}/whoami"' in app.stdout()

    status = app.stop(signal.SIGTERM)
    assert status == -signal.SIGTERM, f"exit status {status}{app.tail()}"
    o2.wait_for_requests(3, timeout=5)
    assert batch_sizes(o2) == [4, 4, 2], f"{batch_sizes(o2)}{app.tail()}"
    records = raw_records(o2)
    check_records(records, audited, app.tail(), window=(started - 1, finished + 1))
    assert len(o2.records_for("_meta", "audit")) == 10
    assert SECRET not in app.stderr()


def test_interval_publishes_without_any_signal(launcher: Launcher, o2: FakeOpenObserve) -> None:
    """O2_AUDIT_BATCH_SIZE=1000, O2_AUDIT_PUBLISH_INTERVAL=0.5: records arrive while the app keeps running."""
    env = env_for(receiver_vars(o2, O2_AUDIT_BATCH_SIZE="1000", O2_AUDIT_PUBLISH_INTERVAL="0.5"))
    app = launcher.uvicorn(env).wait_ready()
    audited = drive(app, (LOGIN, HEALTH, WHOAMI, INGEST_JSON, FORBIDDEN))

    o2.wait_for_records(len(audited), timeout=10)
    assert app.alive(), app.tail()
    check_records(raw_records(o2), audited, app.tail())

    app.stop(signal.SIGTERM)
    assert len(raw_records(o2)) == len(audited), "records published twice or late"


def test_sigterm_flushes_everything_pending(launcher: Launcher, o2: FakeOpenObserve) -> None:
    """Batch 1000, interval 600: nothing is published while the app runs; SIGTERM publishes it all and the
    process exits (killed by the re-raised SIGTERM, as uvicorn intends)."""
    env = env_for(receiver_vars(o2, O2_AUDIT_BATCH_SIZE="1000", O2_AUDIT_PUBLISH_INTERVAL="600"))
    app = launcher.uvicorn(env).wait_ready()
    audited = drive(app, (LOGIN, LIST, HEALTH, CREATE, BROKEN, NO_ROUTE))
    assert o2.requests_log == [], "something was published before the signal"

    status = app.stop(signal.SIGTERM, timeout=20)
    assert status == -signal.SIGTERM, f"exit status {status}{app.tail()}"
    o2.wait_for_requests(1, timeout=5)
    assert batch_sizes(o2) == [len(audited)]
    check_records(raw_records(o2), audited, app.tail())


# ------------------------------------------------------------------------------------------------ disabled
@pytest.mark.parametrize("enabled", [None, "false"], ids=["unset", "false"])
def test_disabled_installs_nothing(launcher: Launcher, o2: FakeOpenObserve, tmp_path: Path,
                                   enabled: Optional[str]) -> None:
    """O2_AUDIT_ENABLED unset or false: the app serves; no audit thread, no file, no connection."""
    audit_file = tmp_path / "audit" / "audit.jsonl"
    overrides: Dict[str, Optional[str]] = {"O2_AUDIT_ENABLED": enabled, "O2_AUDIT_BATCH_SIZE": "1"}
    if enabled is None:
        overrides["O2_AUDIT_ENDPOINT"] = f"file://{audit_file}"
    else:
        overrides.update(O2_AUDIT_ENDPOINT=o2.url, O2_AUDIT_USER=o2.user, O2_AUDIT_PASSWORD=o2.password)
    app = launcher.uvicorn(env_for(overrides)).wait_ready()
    drive(app, MIX)
    assert_not_installed(app)

    status = app.stop(signal.SIGTERM)
    assert status == -signal.SIGTERM, f"exit status {status}{app.tail()}"
    assert not audit_file.parent.exists(), "the disabled audit created its file"
    assert o2.requests_log == [], "the disabled audit sent something"
    assert o2.connections_accepted == 0, "the disabled audit connected"
    assert "otel-o2audit" not in app.stderr(), app.tail()


@pytest.mark.parametrize("required", [None, "true"], ids=["alone", "with-required"])
def test_enabled_false_without_other_settings_is_silent(launcher: Launcher, required: Optional[str]) -> None:
    """O2_AUDIT_ENABLED=false is how users switch auditing off; it must not demand an endpoint.

    Off means "no processor, no thread, no file, no network" (configuration.md): no configuration error
    either, and with O2_AUDIT_REQUIRED=true the app must still start.
    """
    env = env_for({"O2_AUDIT_ENABLED": "false", "O2_AUDIT_REQUIRED": required})
    app = launcher.uvicorn(env).wait_ready()
    drive(app, (LOGIN, HEALTH))
    assert_not_installed(app)
    assert "otel-o2audit" not in app.stderr(), f"a disabled audit reported an error{app.tail()}"


# ------------------------------------------------------------------------------------------------ config errors
BAD_SETTINGS = [
    pytest.param("O2_AUDIT_BATCH_SIZE", "abc", id="batch-size-abc"),
    pytest.param("O2_AUDIT_ENABLED", "maybe", id="enabled-maybe"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_SETTINGS)
def test_config_error_logs_once_and_app_serves_unaudited(launcher: Launcher, o2: FakeOpenObserve,
                                                         variable: str, value: str) -> None:
    env = env_for({**receiver_vars(o2, O2_AUDIT_PASSWORD=SECRET, O2_AUDIT_BATCH_SIZE="1"), variable: value})
    app = launcher.uvicorn(env).wait_ready()
    drive(app, (LOGIN, WHOAMI, HEALTH))
    assert_not_installed(app)
    app.stop(signal.SIGTERM)

    stderr = app.stderr()
    assert stderr.count("invalid otel-o2audit configuration") == 1, app.tail()
    assert stderr.count(variable) == 1, f"{variable} should be named exactly once{app.tail()}"
    assert f"{variable}={value!r}" in stderr, app.tail()
    assert stderr.count("the application runs WITHOUT an audit trail") == 1, app.tail()
    assert SECRET not in stderr, "the password leaked into stderr"
    assert SECRET not in app.stdout(), "the password leaked into stdout"
    assert o2.requests_log == []
    assert o2.connections_accepted == 0


@pytest.mark.parametrize(
    ("variable", "value"),
    [*BAD_SETTINGS,
     pytest.param("O2_AUDIT_ENDPOINT", f"http://root:{SECRET}@127.0.0.1:5080", id="endpoint-with-credentials")],
)
def test_config_error_with_required_exits_78_at_startup(launcher: Launcher, o2: FakeOpenObserve,
                                                        variable: str, value: str) -> None:
    env = env_for({**receiver_vars(o2, O2_AUDIT_PASSWORD=SECRET, O2_AUDIT_REQUIRED="true"), variable: value})
    app = launcher.uvicorn(env)
    status = app.wait_exit(timeout=30)
    assert status == 78, f"exit status {status}{app.tail()}"
    stderr = app.stderr()
    assert variable in stderr, app.tail()
    assert "O2_AUDIT_REQUIRED=true, refusing to start" in stderr, app.tail()
    assert "Application startup complete" not in stderr + app.stdout(), "the app started before exiting"
    assert SECRET not in stderr, "the password leaked into stderr"
    assert SECRET not in app.stdout(), "the password leaked into stdout"
    assert o2.requests_log == []


# ------------------------------------------------------------------------------------------------ OTel switches
def test_otel_sdk_disabled_installs_nothing(launcher: Launcher, tmp_path: Path) -> None:
    audit_file = tmp_path / "audit.jsonl"
    env = env_for({**file_vars(audit_file, O2_AUDIT_BATCH_SIZE="1"), "OTEL_SDK_DISABLED": "true"})
    app = launcher.uvicorn(env).wait_ready()
    drive(app, MIX)
    assert_not_installed(app)
    app.stop(signal.SIGTERM)
    assert not audit_file.exists()
    assert "otel-o2audit" not in app.stderr(), app.tail()  # no warning or error: nothing to complain about


EXPORTER_MIX: Tuple[Call, ...] = (HEALTH, LOGIN, INGEST_JSON, WHOAMI, BROKEN, METRICS, FORBIDDEN, NO_ROUTE)


def test_exporter_path_one_record_per_request(launcher: Launcher, tmp_path: Path) -> None:
    """OTEL_TRACES_EXPORTER=o2audit without O2_AUDIT_ENABLED: the SDK's BatchSpanProcessor feeds the
    exporter every span (server and internal); only server spans of audited requests become records."""
    audit_file = tmp_path / "audit.jsonl"
    env = env_for({"OTEL_TRACES_EXPORTER": "o2audit", "OTEL_BSP_SCHEDULE_DELAY": "50",
                   "O2_AUDIT_ENDPOINT": f"file://{audit_file}"})
    app = launcher.uvicorn(env).wait_ready()
    audited = drive(app, EXPORTER_MIX)
    wait_until(lambda: len(read_jsonl(audit_file)) >= len(audited), 15,
               lambda: f"{len(audited)} records in {audit_file}{app.tail()}")
    names = app.threads()
    assert not audit_threads(names), f"the processor path is active too: {names}"
    audited.append(THREADS)
    wait_until(lambda: len(read_jsonl(audit_file)) >= len(audited), 15,
               lambda: f"{len(audited)} records in {audit_file}{app.tail()}")
    check_records(read_jsonl(audit_file), audited, app.tail())

    status = app.stop(signal.SIGINT)  # SIGINT ends through atexit: the SDK flushes its processors
    assert status == 0, f"exit status {status}{app.tail()}"
    check_records(read_jsonl(audit_file), audited, app.tail())


def test_exporter_and_processor_paths_deliver_each_record_once(launcher: Launcher, tmp_path: Path) -> None:
    """OTEL_TRACES_EXPORTER=o2audit and O2_AUDIT_ENABLED=true: no double install, no duplicate record."""
    audit_file = tmp_path / "audit.jsonl"
    env = env_for({**file_vars(audit_file, O2_AUDIT_BATCH_SIZE="1"), "OTEL_TRACES_EXPORTER": "o2audit",
                   "OTEL_BSP_SCHEDULE_DELAY": "50"})
    app = launcher.uvicorn(env).wait_ready()
    audited = drive(app, EXPORTER_MIX)
    wait_until(lambda: len(read_jsonl(audit_file)) >= len(audited), 15,
               lambda: f"{len(audited)} records in {audit_file}{app.tail()}")
    threads = audit_threads(app.threads())
    assert threads, "the processor path is not active"
    assert len(threads) == len(set(threads)), f"installed twice: {threads}"
    audited.append(THREADS)

    status = app.stop(signal.SIGINT)  # atexit flushes both the SDK's processor and ours
    assert status == 0, f"exit status {status}{app.tail()}"
    check_records(read_jsonl(audit_file), audited, app.tail())


def test_distro_default_otlp_grpc_aborts_all_instrumentation(launcher: Launcher, tmp_path: Path) -> None:
    """OTEL_TRACES_EXPORTER unset: opentelemetry-distro picks otlp over gRPC, whose exporter is not
    installed. The configurator raises before any instrumentor or post_instrument hook runs, so the app
    runs completely uninstrumented and UNAUDITED, even with O2_AUDIT_REQUIRED=true (our hook never runs).
    """
    audit_file = tmp_path / "audit.jsonl"
    env = env_for({**file_vars(audit_file, O2_AUDIT_BATCH_SIZE="1", O2_AUDIT_REQUIRED="true"),
                   "OTEL_TRACES_EXPORTER": None})
    app = launcher.uvicorn(env).wait_ready()
    stderr = app.stderr()
    assert "Failed to auto initialize OpenTelemetry" in stderr, app.tail()
    assert "Requested component 'otlp_proto_grpc' not found" in stderr, app.tail()
    drive(app, MIX)
    names = app.threads()
    assert not audit_threads(names), names
    assert "OtelBatchSpanRecordProcessor" not in names, names
    status = app.stop(signal.SIGTERM)
    assert status == -signal.SIGTERM, f"exit status {status}{app.tail()}"
    assert not audit_file.exists(), "records were written although instrumentation aborted"


def test_distro_default_otlp_over_http_still_audits(launcher: Launcher, tmp_path: Path) -> None:
    """The workaround for the case above: OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf (its exporter is
    installed) lets the configurator succeed, and auditing is installed next to the OTLP exporter."""
    audit_file = tmp_path / "audit.jsonl"
    env = env_for({**file_vars(audit_file, O2_AUDIT_BATCH_SIZE="1"), "OTEL_TRACES_EXPORTER": None,
                   "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
                   "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"})
    app = launcher.uvicorn(env).wait_ready()
    audited = drive(app, (LOGIN, HEALTH, WHOAMI))
    wait_until(lambda: len(read_jsonl(audit_file)) >= len(audited), 15,
               lambda: f"{len(audited)} records{app.tail()}")
    assert audit_threads(app.threads())
    assert "Failed to auto initialize OpenTelemetry" not in app.stderr(), app.tail()
    app.stop(signal.SIGTERM)
    check_records(read_jsonl(audit_file), [*audited, THREADS], app.tail())


def test_fastapi_excluded_urls_warns_at_startup(launcher: Launcher, tmp_path: Path) -> None:
    """OTEL_PYTHON_FASTAPI_EXCLUDED_URLS makes no spans, hence no records: say so at start-up."""
    audit_file = tmp_path / "audit.jsonl"
    env = env_for({**file_vars(audit_file, O2_AUDIT_BATCH_SIZE="1"),
                   "OTEL_PYTHON_FASTAPI_EXCLUDED_URLS": "debug/pid"})
    app = launcher.uvicorn(env).wait_ready()
    warnings = [line for line in app.stderr().splitlines()
                if "otel-o2audit" in line and "OTEL_PYTHON_FASTAPI_EXCLUDED_URLS" in line]
    assert len(warnings) == 1, f"expected one start-up warning naming the variable{app.tail()}"
    assert "NOT audited" in warnings[0], warnings
    assert "O2_AUDIT_EXCLUDE_ROUTES" in warnings[0], warnings

    hidden = Call("GET", "/debug/pid", 200)
    drive(app, (hidden, WHOAMI))
    wait_until(lambda: read_jsonl(audit_file), 10, lambda: f"the whoami record{app.tail()}")
    app.stop(signal.SIGTERM)
    check_records(read_jsonl(audit_file), [WHOAMI], app.tail())
