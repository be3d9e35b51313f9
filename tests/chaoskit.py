"""Helpers for the spool, delivery and chaos tests (``test_spool.py``, ``test_delivery.py``, ``test_chaos.py``).

In-process helpers build audit records and SERVER spans with chosen timestamps and read the spool directory
(segments, ``expired/``, ``rejected/``). Subprocess helpers drive steady, bounded HTTP traffic at a chaos app
from a thread (:class:`Traffic`), index what the loopback receiver stored by request path and ``event_id``, and
balance the books: records delivered plus records the application accounted for (rejected, lost, expired,
dropped) against records produced (:class:`Accounting`).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Mapping, Optional, Set

import requests
from o2receiver import FakeOpenObserve
from opentelemetry.trace import SpanKind, Tracer

# --------------------------------------------------------------------------------------------------
# records, spans, spool files
# --------------------------------------------------------------------------------------------------

#: A fixed, recent enough base for hand-made records (the spool does not look at timestamps).
BASE_US = 1_750_000_000_000_000


def rec(index: int, ts_us: Optional[int] = None, **extra: Any) -> Dict[str, Any]:
    """A small audit-shaped record with a recognisable ``event_id``."""
    record: Dict[str, Any] = {
        "_timestamp": BASE_US + index if ts_us is None else ts_us,
        "event_id": f"ev-{index:05d}",
        "http_method": "GET",
        "http_path": f"/api/acme/things/{index}",
        "http_response_code": 200,
    }
    record.update(extra)
    return record


def server_span(tracer: Tracer, path: str, end_ns: Optional[int] = None) -> None:
    """End a SERVER span shaped like the FastAPI contrib instrumentation's, ending at ``end_ns`` (epoch ns)."""
    attributes: Dict[str, Any] = {
        "http.method": "GET",
        "http.target": path,
        "http.url": f"http://testserver{path}",
        "http.route": "/api/{org_id}/things/{tid}",
        "http.status_code": 200,
        "net.peer.ip": "10.1.2.3",
    }
    start = None if end_ns is None else end_ns - 1_000_000
    span = tracer.start_span(f"GET {path}", kind=SpanKind.SERVER, attributes=attributes, start_time=start)
    span.end(end_time=end_ns)


def segments(spool: Path) -> List[Path]:
    """The spool's segment files (``seg-*.log``), sorted by name."""
    return sorted(p for p in spool.glob("seg-*.log"))


def segment_pid(path: Path) -> int:
    """The pid in a segment's name ``seg-<host>-<pid>-<ns>-<n>.log`` (the host may contain dashes)."""
    return int(path.name[: -len(".log")].rsplit("-", 3)[1])


def side_records(spool: Path, folder: str) -> List[Dict[str, Any]]:
    """Every JSON line under ``spool/folder`` (``expired`` or ``rejected``), files in name order."""
    out: List[Dict[str, Any]] = []
    for path in sorted((spool / folder).glob("*.jsonl")):
        out.extend(json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return out


def index_by_path(records: Iterable[Mapping[str, Any]], prefix: str) -> Dict[str, Counter[str]]:
    """``http_path`` -> Counter of ``event_id`` for the records whose path starts with ``prefix``."""
    out: Dict[str, Counter[str]] = {}
    for record in records:
        path = str(record.get("http_path", ""))
        if path.startswith(prefix):
            out.setdefault(path, Counter())[str(record["event_id"])] += 1
    return out


# --------------------------------------------------------------------------------------------------
# subprocess chaos runs
# --------------------------------------------------------------------------------------------------

#: The chaos app, importable from the repository root (the subprocesses' cwd and PYTHONPATH).
CHAOS_APP = "tests.chaosapp:app"


def chaos_env(receiver: FakeOpenObserve, spool: Path, **extra: str) -> Dict[str, str]:
    """``O2_AUDIT_*`` settings for a chaos app: the receiver, a spool, short timings; ``extra`` wins."""
    env = {
        "OTEL_SERVICE_NAME": "o2audit-chaos",
        "O2_AUDIT_ENABLED": "true",
        "O2_AUDIT_ENDPOINT": receiver.url,
        "O2_AUDIT_USER": receiver.user,
        "O2_AUDIT_PASSWORD": receiver.password,
        "O2_AUDIT_SPOOL_DIR": str(spool),
        "O2_AUDIT_EXCLUDE_ROUTES": "default,/__stats",
        "O2_AUDIT_BATCH_SIZE": "50",
        "O2_AUDIT_PUBLISH_INTERVAL": "0.3",
        "O2_AUDIT_TIMEOUT": "0.5",
        "O2_AUDIT_RETRY_INITIAL_BACKOFF": "0.05",
        "O2_AUDIT_RETRY_MAX_ELAPSED": "10",
        "O2_AUDIT_SHUTDOWN_TIMEOUT": "2",
    }
    env.update(extra)
    return env


@dataclass
class Sent:
    """One request of the traffic thread."""

    index: int
    path: str
    sent_at: float
    answered_at: Optional[float] = None
    status: Optional[int] = None
    pid: Optional[int] = None
    error: Optional[str] = None


class Traffic:
    """Steady, bounded GET traffic at ``/api/{tag}/items/{i}`` from a daemon thread.

    ``count`` requests at most, one every ``interval`` seconds (paced, not hoped on). ``fresh=True`` opens a
    new connection per request (lets the kernel spread them over a pre-fork server's workers). The first
    connection error ends the run when ``stop_on_error`` (the application was stopped or killed).
    """

    def __init__(self, base_url: str, tag: str, count: int, interval: float = 0.004, fresh: bool = False,
                 stop_on_error: bool = True) -> None:
        self.base_url = base_url
        self.tag = tag
        self.count = count
        self.interval = interval
        self.fresh = fresh
        self.stop_on_error = stop_on_error
        self.sent: List[Sent] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name=f"traffic-{tag}", daemon=True)

    @property
    def prefix(self) -> str:
        return f"/api/{self.tag}/items/"

    def start(self) -> Traffic:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        session = requests.Session()
        session.trust_env = False
        headers = {"Connection": "close"} if self.fresh else {}
        try:
            for index in range(self.count):
                if self._stop.is_set():
                    break
                entry = Sent(index, f"{self.prefix}{index}", time.monotonic())
                try:
                    response = session.get(self.base_url + entry.path, headers=headers, timeout=10)
                    entry.answered_at = time.monotonic()
                    entry.status = response.status_code
                    if response.status_code == 200:
                        entry.pid = int(response.json()["pid"])
                except requests.RequestException as exc:
                    entry.error = f"{type(exc).__name__}: {exc}"
                with self._cond:
                    self.sent.append(entry)
                    self._cond.notify_all()
                if entry.error is not None and self.stop_on_error:
                    break
                self._stop.wait(self.interval)
        finally:
            session.close()
            with self._cond:
                self._done = True
                self._cond.notify_all()

    def answered(self) -> List[Sent]:
        """Requests that got a 200 response: each produced one audit record."""
        with self._lock:
            return [s for s in self.sent if s.status == 200]

    def errors(self) -> List[Sent]:
        with self._lock:
            return [s for s in self.sent if s.status != 200]

    def wait_answered(self, n: int, timeout: float = 30.0) -> None:
        """Wait until ``n`` requests were answered (fails if the run ends first)."""
        def ready() -> bool:
            return sum(1 for s in self.sent if s.status == 200) >= n or self._done

        with self._cond:
            self._cond.wait_for(ready, timeout)
            got = sum(1 for s in self.sent if s.status == 200)
        if got < n:
            raise AssertionError(f"traffic {self.tag}: {got} answered, wanted {n} (done={self._done}); "
                                 f"errors: {[s.error for s in self.errors()][:3]}")

    def join(self, timeout: float = 60.0) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise AssertionError(f"traffic {self.tag} still running after {timeout}s")


def app_stats(base_url: str) -> Dict[str, int]:
    """``otel_o2audit.stats()`` of the process that answers ``/__stats``."""
    with requests.Session() as session:
        session.trust_env = False
        response = session.get(base_url + "/__stats", timeout=5)
    response.raise_for_status()
    stats: Dict[str, int] = response.json()["stats"]
    return stats


@dataclass
class Accounting:
    """Delivered plus accounted against produced, for one traffic run."""

    produced: Set[str]
    delivered: Dict[str, Counter[str]]
    stats: Dict[str, int] = field(default_factory=dict)

    @property
    def delivered_produced(self) -> Set[str]:
        return set(self.delivered) & self.produced

    @property
    def missing(self) -> Set[str]:
        return self.produced - set(self.delivered)

    @property
    def unexpected(self) -> Set[str]:
        """Delivered paths that were never answered (allowed only when the application died mid-request)."""
        return set(self.delivered) - self.produced

    @property
    def duplicates(self) -> int:
        """Records stored more than once (same ``event_id``): at-least-once delivery at work."""
        return sum(n - 1 for events in self.delivered.values() for n in events.values())

    @property
    def split_paths(self) -> List[str]:
        """Paths delivered under more than one ``event_id``: one request, two records (always a bug)."""
        return sorted(p for p, events in self.delivered.items() if len(events) > 1)

    @property
    def accounted(self) -> int:
        s = self.stats
        return s.get("rejected", 0) + s.get("lost", 0) + s.get("expired", 0) + s.get("dropped", 0)

    @property
    def balanced(self) -> bool:
        return len(self.delivered_produced) + self.accounted == len(self.produced)

    def summary(self) -> str:
        return (f"produced={len(self.produced)} delivered_distinct={len(self.delivered_produced)} "
                f"duplicates={self.duplicates} missing={len(self.missing)} unexpected={len(self.unexpected)} "
                f"split={len(self.split_paths)} stats={self.stats}")


def accounting(receiver: FakeOpenObserve, traffic: Traffic, stats: Optional[Dict[str, int]] = None) -> Accounting:
    produced = {s.path for s in traffic.answered()}
    delivered = index_by_path(receiver.records_for(), traffic.prefix)
    return Accounting(produced, delivered, dict(stats or {}))


def wait_for(predicate: Any, timeout: float, message: Any, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until truthy (returned); AssertionError with ``message()`` or ``message`` after
    ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {text}")
        threading.Event().wait(interval)


def live_pids(paths: Iterable[Path]) -> Set[int]:
    """The pids of segment files whose owner process still exists."""
    pids = set()
    for path in paths:
        pid = segment_pid(path)
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            continue
        except PermissionError:
            pass
        pids.add(pid)
    return pids
