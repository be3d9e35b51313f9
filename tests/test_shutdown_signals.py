"""The real stop signals flush every pending audit record, under each supported server mode.

Zero-code setup (``opentelemetry-instrument``) with a ``file://`` sink, O2_AUDIT_BATCH_SIZE=1000 and
O2_AUDIT_PUBLISH_INTERVAL=600, so that nothing is published before the signal: whatever the sink holds after
the process has exited was flushed by the shutdown path under test.

* uvicorn: SIGTERM and SIGINT (uvicorn restores the previous handler after its graceful shutdown and
  re-raises the signal; the audit's handler, installed before uvicorn started, must flush then).
* gunicorn + UvicornWorker, 2 workers, with and without ``--preload``: SIGTERM to the master; the workers
  (forked, their signal handlers reset to the defaults by UvicornWorker) must each flush their own records.
* the exporter path (``OTEL_TRACES_EXPORTER=o2audit``) under uvicorn: SIGTERM must not lose what the SDK's
  BatchSpanProcessor still holds.
"""

from __future__ import annotations

import signal
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Sequence, Set, Tuple

import pytest
from procs import AppProcess, Launcher, child_env, read_jsonl, wait_until

SERVICE = "shutdown-signal-test"


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    pool = Launcher(tmp_path)
    try:
        yield pool
    finally:
        pool.cleanup()


def audit_env(audit_file: Path, **extra: str) -> Dict[str, str]:
    return child_env({
        "OTEL_SERVICE_NAME": SERVICE,
        "O2_AUDIT_ENABLED": "true",
        "O2_AUDIT_ENDPOINT": f"file://{audit_file}",
        "O2_AUDIT_BATCH_SIZE": "1000",
        "O2_AUDIT_PUBLISH_INTERVAL": "600",
        # /debug/* answers the tests' own questions (which worker, which threads): not part of the trail.
        "O2_AUDIT_EXCLUDE_ROUTES": "/healthz,/debug/**",
        **extra,
    })


def send_audited(app: AppProcess, count: int, fresh: bool = False) -> List[Tuple[str, str, int]]:
    """``count`` audited requests of a few kinds; return (method, path, status) of each."""
    sent = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            method, path, status, body = "GET", f"/api/org{index}/whoami", 200, None
        elif kind == 1:
            method, path, status, body = "POST", f"/api/org{index}/dashboards", 201, {"title": f"d{index}"}
        elif kind == 2:
            method, path, status, body = "DELETE", f"/api/org{index}/settings", 403, None
        else:
            method, path, status, body = "GET", f"/api/org{index}/dashboards/none", 404, None
        send = app.fresh_request if fresh else app.request
        response = send(method, path, json=body)
        assert response.status_code == status, f"{method} {path} -> {response.status_code}{app.tail()}"
        sent.append((method, path, status))
    return sent


def assert_each_once(records: Sequence[Dict[str, Any]], sent: Sequence[Tuple[str, str, int]], tail: str) -> None:
    got = Counter((r["http_method"], r["http_path"], r["http_response_code"]) for r in records)
    missing = Counter(sent) - got
    extra = got - Counter(sent)
    summary = f"{len(records)} records for {len(sent)} requests; missing {dict(missing)}, unexpected {dict(extra)}"
    assert not missing, f"{summary}{tail}"
    assert not extra, f"{summary}{tail}"
    event_ids = [r["event_id"] for r in records]
    assert len(set(event_ids)) == len(event_ids), f"a record was written twice{tail}"
    assert all(r["service_name"] == SERVICE for r in records)


# ------------------------------------------------------------------------------------------------ uvicorn
@pytest.mark.parametrize(
    ("signum", "expected_status"),
    [
        # uvicorn re-raises SIGTERM after its graceful shutdown: the audit handler publishes, then lets the
        # default action end the process ("killed by SIGTERM", as without the audit).
        pytest.param(signal.SIGTERM, -signal.SIGTERM, id="SIGTERM"),
        # SIGINT: the audit handler flushes and chains to Python's handler; the interpreter exits normally.
        pytest.param(signal.SIGINT, 0, id="SIGINT"),
    ],
)
def test_uvicorn_signal_flushes_pending_records(launcher: Launcher, tmp_path: Path, signum: int,
                                                expected_status: int) -> None:
    audit_file = tmp_path / "audit.jsonl"
    app = launcher.uvicorn(audit_env(audit_file)).wait_ready()
    sent = send_audited(app, 12)
    assert not audit_file.exists(), "records were published before the signal"

    status = app.stop(signum, timeout=20)
    assert status == expected_status, f"exit status {status}{app.tail()}"
    assert_each_once(read_jsonl(audit_file), sent, app.tail())


# ------------------------------------------------------------------------------------------------ gunicorn
def _worker_pids(app: AppProcess, want: int, timeout: float = 20.0) -> Set[int]:
    """Wait until ``want`` different workers have answered (new connection per request)."""
    seen: Set[int] = set()

    def all_seen() -> bool:
        seen.add(app.fresh_request("GET", "/debug/pid").json()["pid"])
        return len(seen) >= want

    wait_until(all_seen, timeout, lambda: f"{want} workers to answer, saw {seen}{app.tail()}", interval=0.01)
    return seen


@pytest.mark.parametrize("preload", [False, True], ids=["no-preload", "preload"])
def test_gunicorn_uvicorn_workers_sigterm_flushes_every_worker(launcher: Launcher, tmp_path: Path,
                                                               preload: bool) -> None:
    audit_file = tmp_path / "audit.jsonl"
    app = launcher.gunicorn(audit_env(audit_file), workers=2, preload=preload).wait_ready()
    pids = _worker_pids(app, 2)

    # Audited requests until both workers have served at least 5 (each request on a new connection, so
    # either worker may accept it); every one of them must be in the file exactly once after SIGTERM.
    served: Counter[int] = Counter()
    sent: List[Tuple[str, str, int]] = []

    def both_served_enough() -> bool:
        path = f"/api/org{len(sent)}/whoami"
        response = app.fresh_request("GET", path)
        assert response.status_code == 200, f"GET {path} -> {response.status_code}{app.tail()}"
        sent.append(("GET", path, 200))
        served[response.json()["pid"]] += 1
        return len(served) == 2 and min(served.values()) >= 5 and len(sent) >= 20

    wait_until(both_served_enough, 30, lambda: f"both workers to serve audited requests: {served}{app.tail()}",
               interval=0)
    assert set(served) == pids, (served, pids)
    assert not audit_file.exists(), "records were published before the signal"

    status = app.stop(signal.SIGTERM, timeout=30)
    assert status == 0, f"gunicorn master exit status {status}{app.tail()}"
    assert_each_once(read_jsonl(audit_file), sent, f"\nworkers served {dict(served)}{app.tail()}")


# ------------------------------------------------------------------------------------------------ exporter path
def test_exporter_path_sigterm_under_uvicorn_keeps_pending_records(launcher: Launcher, tmp_path: Path) -> None:
    """OTEL_TRACES_EXPORTER=o2audit alone: spans wait in the SDK's BatchSpanProcessor (OTEL_BSP_SCHEDULE_DELAY,
    5 s by default; 10 min here to make the case deterministic). uvicorn re-raises SIGTERM with the default
    action, which ends the process without atexit, so unless the plugin flushes the TracerProvider on the
    signal every record still queued there is lost on each ordinary stop (a deploy, a scale-down)."""
    audit_file = tmp_path / "audit.jsonl"
    env = child_env({"OTEL_SERVICE_NAME": SERVICE, "OTEL_TRACES_EXPORTER": "o2audit",
                     "OTEL_BSP_SCHEDULE_DELAY": "600000", "O2_AUDIT_ENDPOINT": f"file://{audit_file}",
                     "O2_AUDIT_EXCLUDE_ROUTES": "/healthz,/debug/**"})
    app = launcher.uvicorn(env).wait_ready()
    sent = send_audited(app, 6)
    assert not audit_file.exists()

    app.stop(signal.SIGTERM, timeout=20)
    assert_each_once(read_jsonl(audit_file), sent, app.tail())
