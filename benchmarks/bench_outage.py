"""Memory while OpenObserve is down, under steady load; then the recovery: drain time and accounting.

Each mode runs in its own child process (so its RSS is its own), built the way an application builds it: a
real ``TracerProvider`` and ``otel_o2audit.install(provider, endpoint=..., ...)``. The child feeds real HTTP
SERVER spans at a fixed rate (``--rate``, default 500/s; each request in its own ``contextvars.Context``,
as an ASGI server runs it), paced against ``perf_counter`` deadlines on a 10 ms tick, and samples its own
``VmRSS``/``VmHWM`` (``/proc/self/status``), the spool's size on disk and ``otel_o2audit.stats()`` every
second.

Modes:

* ``spool``: ``spool_dir=<tmp>`` (overflow policy ``spool``, the default with a spool);
* ``drop``: no spool, ``overflow="drop"``: memory is bounded by ``O2_AUDIT_MAX_QUEUE_SIZE``, drops counted;
* ``baseline``: the same span load on a ``TracerProvider`` with no audit processor at all.

The sink: each audit mode's child starts its own loopback receiver (``receiver`` sub-command, a separate
process). While the sink is "down" the receiver holds its port bound but does not listen, so every
connection is refused (``--down refuse``, the default: nothing listens there), or it listens and answers
503 (``--down 503``). When the outage ends, the receiver starts answering 200 with OpenObserve's JSON counts
on the same port, and records every ``event_id`` it receives. The load keeps running (the application does
not stop when OpenObserve comes back); the child measures how long until the first batch is acknowledged
and until every record captured before the recovery is settled, then stops the load, shuts the provider
down (which publishes the rest) and checks the books: distinct ``event_id`` received == captured - lost -
rejected - expired, and spans produced == captured + dropped + skipped.

The parent runs the modes at most ``--parallel`` (2) at a time. Run it through ``run.py --outage``; this
module can also be run alone: ``python bench_outage.py [--minutes N]`` (prints the tables, writes nothing).
"""

from __future__ import annotations

import argparse
import contextlib
import contextvars
import gzip
import json
import logging
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import IO, Any, Callable, Dict, List, Optional, Sequence, Tuple

__all__ = [
    "MODES",
    "ModeRun",
    "OutageResults",
    "outage_sections",
    "run_outage",
]

HERE = os.path.dirname(os.path.abspath(__file__))
SPOOL, DROP, BASELINE = "spool", "drop", "baseline"
MODES = (SPOOL, DROP, BASELINE)
MODE_LABELS = {
    SPOOL: "(i) spool on (overflow=spool)",
    DROP: "(ii) no spool, overflow=drop",
    BASELINE: "(iii) baseline: no audit processor",
}
TICK = 0.01  # pacing tick of the load loop, seconds
RETRY_INITIAL_BACKOFF = 0.5
PUBLISH_INTERVAL = 1.0
GROWTH_LIMIT_MB_PER_MIN = 1.0  # "bounded": RSS grows by at most this much per minute after the first minute
_MB = 1024.0  # kB per MB (VmRSS is in kB)


# ====================================================================== the loopback sink (its own process)
class _SinkState:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.up = False
        self.statuses: Dict[str, int] = {}
        self.records = 0
        self.ids: set[str] = set()
        self.first_ok: Optional[float] = None  # time.time() of the first 200

    def snapshot(self) -> Dict[str, Any]:
        with self.lock:
            return {
                "statuses": dict(self.statuses),
                "records": self.records,
                "distinct": len(self.ids),
                "duplicates": self.records - len(self.ids),
                "first_ok": self.first_ok,
            }


_STATE = _SinkState()


class _SinkHandler(BaseHTTPRequestHandler):
    """503 while down; once up, OpenObserve's ``_json`` answer with the true counts."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def log_message(self, format: str, *args: object) -> None:
        """Silence the access log."""

    def _reply(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        """``/stats``: what arrived so far."""
        self._reply(200, json.dumps(_STATE.snapshot()).encode())

    def do_POST(self) -> None:
        """Count the records and their distinct ``event_id``."""
        wire = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not _STATE.up:
            with _STATE.lock:
                _STATE.statuses["503"] = _STATE.statuses.get("503", 0) + 1
            self._reply(503, b'{"code":503,"message":"service unavailable"}')
            return
        body = gzip.decompress(wire) if self.headers.get("Content-Encoding") == "gzip" else wire
        records = json.loads(body)
        ids = [str(r["event_id"]) for r in records]
        with _STATE.lock:
            _STATE.statuses["200"] = _STATE.statuses.get("200", 0) + 1
            _STATE.records += len(ids)
            _STATE.ids.update(ids)
            if _STATE.first_ok is None:
                _STATE.first_ok = time.time()
        self._reply(200, b'{"code":200,"status":[{"name":"audit","successful":%d,"failed":0}]}' % len(ids))


def receiver_main(down: str) -> None:
    """Bind 127.0.0.1:0 and print the port. ``refuse``: do not listen yet (connections are refused);
    ``503``: listen and answer 503. A line ``up`` on stdin makes it listen (if needed) and answer 200."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _SinkHandler, bind_and_activate=False)
    server.daemon_threads = True
    server.server_bind()
    listening = False

    def listen() -> None:
        server.server_activate()
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()

    if down == "503":
        listen()
        listening = True
    print(server.server_address[1], flush=True)
    for line in sys.stdin:
        if line.strip() == "up":
            _STATE.up = True
            if not listening:
                listen()
                listening = True
            print("up", flush=True)
    server.server_close()


# ====================================================================== the application (child process)
def _proc_status() -> Dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def _dir_bytes(path: Optional[str]) -> int:
    if not path:
        return 0
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class _Emitter:
    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def __call__(self, kind: str, **data: Any) -> None:
        self._stream.write(json.dumps({"kind": kind, **data}) + "\n")
        self._stream.flush()


class _Load:
    """Real SERVER spans at ``rate`` per second on one schedule that runs across phases."""

    def __init__(self, tracer: Any, rate: float, seed: int) -> None:
        from bench_spans import request_attributes
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind, Status, StatusCode

        rng = random.Random(seed)
        # A pool of distinct requests, reused cyclically (each span still gets fresh ids).
        self._pool = [request_attributes(index, rng) for index in range(997)]
        self._tracer = tracer
        self._rate = rate
        self._empty = Context()
        self._server = SpanKind.SERVER
        self._error = Status(StatusCode.ERROR, "RuntimeError: report backend unavailable")
        self._exception = RuntimeError("report backend unavailable")
        self.sent = 0
        self.t0: Optional[float] = None
        self.max_lag = 0.0  # seconds behind schedule, worst seen

    def _request(self) -> None:
        name, attributes, status, failed = self._pool[self.sent % len(self._pool)]
        span = self._tracer.start_span(name, context=self._empty, kind=self._server, attributes=attributes)
        span.set_attribute("http.status_code", status)
        if failed:
            span.record_exception(self._exception)
            span.set_status(self._error)
        span.end()

    def run(self, seconds: float, on_tick: Callable[[float], bool]) -> float:
        """Keep the schedule for ``seconds`` or until ``on_tick(now)`` returns True; return the time used."""
        start = time.perf_counter()
        if self.t0 is None:
            self.t0 = start
        next_tick = start
        while True:
            now = time.perf_counter()
            if now - start >= seconds or on_tick(now):
                return now - start
            due = int((now - self.t0) * self._rate) - self.sent
            if due > 0:
                self.max_lag = max(self.max_lag, due / self._rate)
                for _ in range(due):
                    contextvars.Context().run(self._request)  # a request's own context, as under ASGI
                    self.sent += 1
            next_tick += TICK
            delay = next_tick - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            elif delay < -1.0:
                next_tick = time.perf_counter()  # far behind: do not spin to catch up ticks


def child_main(args: argparse.Namespace) -> int:
    """One mode: steady load with the sink down, then (audit modes) recovery; JSON lines on stdout."""
    emit = _Emitter(sys.stdout)
    status0 = _proc_status()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # INFO for the library: its retry lines ("attempt N ... retrying in X s") show the backoff schedule.
    logging.getLogger("otel_o2audit").setLevel(logging.INFO)
    sys.path.insert(0, HERE)
    from bench_spans import INSTRUMENTATION_SCOPE, RESOURCE
    from opentelemetry.sdk.trace import TracerProvider

    import otel_o2audit

    status1 = _proc_status()
    mode: str = args.mode
    provider = TracerProvider(resource=RESOURCE)
    receiver: Optional[subprocess.Popen[str]] = None
    processor: Optional[otel_o2audit.O2AuditSpanProcessor] = None
    store_adds = [0, 0]  # store.add calls (collector drains), records in them
    spool_dir = args.spool_dir if mode == SPOOL else None
    if mode != BASELINE:
        receiver = subprocess.Popen(  # our own child; stopped through its stdin, then by its handle
            [sys.executable, os.path.abspath(__file__), "receiver", "--down", args.down],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert receiver.stdout is not None
        assert receiver.stdin is not None
        port = int(receiver.stdout.readline())
        settings: Dict[str, Any] = {
            "endpoint": f"http://127.0.0.1:{port}",
            "user": "bench@example.com",
            "password": "bench-password",
            "publish_interval": PUBLISH_INTERVAL,
            "retry_initial_backoff": RETRY_INITIAL_BACKOFF,
        }
        if mode == SPOOL:
            settings["spool_dir"] = spool_dir
        else:
            settings["overflow"] = "drop"
        processor = otel_o2audit.install(provider, **settings)
        store = processor._store
        assert store is not None
        add = store.add

        def counting_add(records: Sequence[Any]) -> int:
            store_adds[0] += 1
            store_adds[1] += len(records)
            return add(records)

        store.add = counting_add  # type: ignore[method-assign]
        emit("config", settings={k: v for k, v in settings.items() if k != "password"},
             max_queue_size=processor._max_queue, batch_size=processor._batch_size,
             overflow=processor._overflow_policy, retry_max_elapsed=processor._config.retry_max_elapsed)
    tracer = provider.get_tracer(INSTRUMENTATION_SCOPE, "0.66b2")
    load = _Load(tracer, args.rate, seed=args.seed)
    status2 = _proc_status()
    emit("start", rss_bare_kb=status0["VmRSS"], rss_imported_kb=status1["VmRSS"], rss_ready_kb=status2["VmRSS"])
    cpu0 = _cpu_seconds()
    began = time.perf_counter()

    def sample(phase: str, now: float) -> Dict[str, Any]:
        status = _proc_status()
        data: Dict[str, Any] = {
            "t": round(now - began, 3), "phase": phase, "rss_kb": status["VmRSS"], "hwm_kb": status["VmHWM"],
            "sent": load.sent, "cpu_s": round(_cpu_seconds() - cpu0, 3), "spool_bytes": _dir_bytes(spool_dir),
            "stats": otel_o2audit.stats(), "adds": store_adds[0], "added": store_adds[1],
        }
        if processor is not None:
            assert processor._store is not None
            data["intake"] = len(processor._intake)
            data["pending"] = processor._store.pending()
            data["in_memory"] = processor._store.in_memory() + processor._inflight
        emit("sample", **data)
        return data

    next_sample = [began + 1.0]

    def sampler(phase: str) -> Callable[[float], bool]:
        def on_tick(now: float) -> bool:
            if now >= next_sample[0]:
                next_sample[0] += 1.0
                sample(phase, now)
            return False

        return on_tick

    sample("outage", began)
    load.run(args.minutes * 60.0, sampler("outage"))
    end = sample("outage_end", time.perf_counter())
    outage = {"seconds": end["t"], "sent": load.sent, "max_lag_s": load.max_lag, "cpu_s": end["cpu_s"]}
    emit("outage_end", **outage)
    if processor is None or receiver is None:
        provider.shutdown()
        emit("done", drained=None, final_stats=otel_o2audit.stats(), sent=load.sent)
        return 0

    # ---- the sink comes back on the same port; the load goes on
    assert receiver.stdin is not None
    assert receiver.stdout is not None
    at_up = otel_o2audit.stats()
    backlog = at_up["captured"]
    settled_at_up = at_up["published"] + at_up["lost"] + at_up["rejected"] + at_up["expired"]
    receiver.stdin.write("up\n")
    receiver.stdin.flush()
    receiver.stdout.readline()
    t_up = time.perf_counter()
    first: List[Optional[float]] = [None]
    drained: List[Optional[float]] = [None]
    sent_at_up = load.sent
    drain_sampler = sampler("drain")

    def watch(now: float) -> bool:
        drain_sampler(now)
        counts = otel_o2audit.stats()
        if first[0] is None and counts["published"] > at_up["published"]:
            first[0] = now - t_up
        settled = counts["published"] + counts["lost"] + counts["rejected"] + counts["expired"]
        if settled >= backlog:
            drained[0] = now - t_up
            return True
        return False

    load.run(args.drain_timeout, watch)
    after_drain = sample("drained", time.perf_counter())
    load_cpu = _cpu_seconds() - cpu0
    t_stop = time.perf_counter()
    provider.shutdown()  # publishes what is pending within O2_AUDIT_SHUTDOWN_TIMEOUT
    shutdown_s = time.perf_counter() - t_stop
    final_stats = otel_o2audit.stats()
    status = _proc_status()
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    with opener.open(f"http://127.0.0.1:{port}/stats", timeout=30) as response:
        received = json.load(response)
    receiver.stdin.close()
    try:
        receiver.wait(10)
    except subprocess.TimeoutExpired:
        receiver.kill()
        receiver.wait()
    emit("done", backlog=backlog, settled_at_up=settled_at_up, stats_at_up=at_up, first_delivery_s=first[0],
         drained_s=drained[0], drain_timeout_s=args.drain_timeout, sent=load.sent, sent_during_drain=load.sent -
         sent_at_up, shutdown_s=shutdown_s, final_stats=final_stats, received=received,
         spool_bytes_after=_dir_bytes(spool_dir), hwm_kb_final=status["VmHWM"], rss_kb_final=status["VmRSS"],
         rss_kb_drained=after_drain["rss_kb"], cpu_s_total=load_cpu, adds=store_adds[0], added=store_adds[1])
    return 0


# ====================================================================== the parent: scheduling and analysis
@dataclass
class ModeRun:
    """Everything one mode's child reported."""

    mode: str
    minutes: float
    config: Dict[str, Any] = field(default_factory=dict)
    start: Dict[str, Any] = field(default_factory=dict)
    samples: List[Dict[str, Any]] = field(default_factory=list)
    outage_end: Dict[str, Any] = field(default_factory=dict)
    done: Dict[str, Any] = field(default_factory=dict)
    returncode: Optional[int] = None
    log_path: str = ""
    log_counts: Dict[str, int] = field(default_factory=dict)
    log_tail: List[str] = field(default_factory=list)
    backoffs: List[float] = field(default_factory=list)  # "retrying in X s" of the client, in order

    # ---- derived figures
    def outage_samples(self) -> List[Dict[str, Any]]:
        """Samples taken while the sink was down."""
        return [s for s in self.samples if s["phase"] in ("outage", "outage_end")]

    def drain_samples(self) -> List[Dict[str, Any]]:
        """Samples taken after the sink came back."""
        return [s for s in self.samples if s["phase"] in ("drain", "drained")]

    @property
    def ok(self) -> bool:
        """The child finished and reported."""
        return self.returncode == 0 and bool(self.done) and bool(self.outage_end)

    def peak_rss_mb(self) -> float:
        """Highest VmRSS sampled during the outage."""
        return max(s["rss_kb"] for s in self.outage_samples()) / _MB

    def hwm_outage_mb(self) -> float:
        """VmHWM at the end of the outage (the kernel's peak, between samples too)."""
        return self.outage_samples()[-1]["hwm_kb"] / _MB

    def reference_t(self) -> float:
        """RSS growth is measured from 1 minute in (from half-way for runs of 2 minutes or less)."""
        return 60.0 if self.minutes * 60.0 > 120.0 else self.minutes * 30.0

    def rss_at(self, t: float) -> float:
        """VmRSS (MB) of the first outage sample at or after ``t`` seconds."""
        for s in self.outage_samples():
            if s["t"] >= t:
                return float(s["rss_kb"]) / _MB
        return float(self.outage_samples()[-1]["rss_kb"]) / _MB

    def rss_end_mb(self) -> float:
        """VmRSS at the end of the outage."""
        return float(self.outage_samples()[-1]["rss_kb"]) / _MB

    def growth_endpoints(self) -> float:
        """(RSS at the end - RSS at the reference time) per minute between them."""
        ref = self.reference_t()
        span_min = (self.outage_samples()[-1]["t"] - ref) / 60.0
        return (self.rss_end_mb() - self.rss_at(ref)) / span_min if span_min > 0 else 0.0

    def growth_fit(self) -> float:
        """Least-squares slope of VmRSS (MB/min) over the samples after the reference time."""
        points = [(s["t"] / 60.0, s["rss_kb"] / _MB) for s in self.outage_samples() if s["t"] >= self.reference_t()]
        if len(points) < 3:
            return 0.0
        mean_x = sum(x for x, _ in points) / len(points)
        mean_y = sum(y for _, y in points) / len(points)
        sxx = sum((x - mean_x) ** 2 for x, _ in points)
        sxy = sum((x - mean_x) * (y - mean_y) for x, y in points)
        return sxy / sxx if sxx else 0.0

    def cpu_percent(self) -> float:
        """CPU (all threads) over the outage, percent of one core."""
        end = self.outage_end
        return 100.0 * end["cpu_s"] / end["seconds"] if end.get("seconds") else 0.0

    def rate(self) -> float:
        """Spans per second actually produced during the outage."""
        end = self.outage_end
        return end["sent"] / end["seconds"] if end.get("seconds") else 0.0

    def stats_at_end(self) -> Dict[str, int]:
        """``otel_o2audit.stats()`` when the outage ended."""
        return dict(self.outage_samples()[-1]["stats"])

    def max_in_memory(self) -> int:
        """Most records held in memory (intake + store + in flight) in any sample of the outage."""
        return max((s.get("intake", 0) + s.get("in_memory", 0) for s in self.outage_samples()), default=0)

    def max_spool_mb(self) -> float:
        """Largest spool directory size sampled during the outage."""
        return max((s["spool_bytes"] for s in self.outage_samples()), default=0) / 1e6

    def adds_per_second(self) -> Tuple[float, float]:
        """Store appends per second during the outage, and records per append."""
        last = self.outage_samples()[-1]
        seconds = last["t"] or 1.0
        adds = last.get("adds", 0)
        return adds / seconds, (last.get("added", 0) / adds if adds else 0.0)

    def peak_drain_mb(self) -> float:
        """Highest VmRSS sampled after the sink came back."""
        return max((s["rss_kb"] for s in self.drain_samples()), default=0) / _MB

    def accounted(self) -> Tuple[int, int, bool]:
        """(distinct event_ids received, captured - lost - rejected - expired, equal)."""
        final = self.done.get("final_stats") or {}
        expected = final.get("captured", 0) - final.get("lost", 0) - final.get("rejected", 0) - final.get("expired", 0)
        distinct = int((self.done.get("received") or {}).get("distinct", -1))
        return distinct, expected, distinct == expected

    def spans_accounted(self) -> Tuple[int, int, bool]:
        """(spans produced, captured + dropped + skipped, equal)."""
        final = self.done.get("final_stats") or {}
        total = final.get("captured", 0) + final.get("dropped", 0) + final.get("skipped", 0)
        sent = int(self.done.get("sent", -1))
        return sent, total, sent == total


@dataclass
class OutageResults:
    """All modes of one run."""

    minutes: float
    baseline_minutes: float
    rate: float
    down: str
    parallel: int
    wall_s: float
    runs: Dict[str, ModeRun]
    work: str = ""  # where the children's logs and samples were kept


def _read_child(proc: subprocess.Popen[str], run: ModeRun, progress: Callable[[str], None]) -> None:
    assert proc.stdout is not None
    last_note = 0.0
    for line in proc.stdout:
        try:
            event = json.loads(line)
        except ValueError:
            progress(f"{run.mode}: {line.rstrip()}")
            continue
        kind = event.pop("kind")
        if kind == "sample":
            run.samples.append(event)
            if time.monotonic() - last_note >= 60.0 or event["phase"] in ("outage_end", "drained"):
                last_note = time.monotonic()
                counts = event["stats"]
                progress(f"{run.mode:8s} {event['phase']:10s} t={event['t']:6.0f}s rss={event['rss_kb'] / _MB:6.1f} MB "
                         f"spool={event['spool_bytes'] / 1e6:7.1f} MB captured={counts['captured']} "
                         f"published={counts['published']} dropped={counts['dropped']} lost={counts['lost']}")
        elif kind == "config":
            run.config = event
        elif kind == "start":
            run.start = event
        elif kind == "outage_end":
            run.outage_end = event
        elif kind == "done":
            run.done = event


_BACKOFF = re.compile(r"attempt \d+ for \d+ records failed .*; retrying in ([0-9.]+)s$")


def _scan_log(run: ModeRun) -> None:
    counts: Dict[str, int] = {}
    tail: List[str] = []
    try:
        with open(run.log_path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                parts = line.split()
                level = parts[2] if len(parts) > 2 else ""
                match = _BACKOFF.search(line.rstrip())
                if match:
                    run.backoffs.append(float(match.group(1)))
                if level in ("WARNING", "ERROR", "CRITICAL"):
                    counts[level] = counts.get(level, 0) + 1
                elif line.startswith("Traceback"):
                    counts["Traceback"] = counts.get("Traceback", 0) + 1
                tail.append(line.rstrip())
                tail = tail[-5:]
    except OSError:
        pass
    run.log_counts = counts
    run.log_tail = tail


def run_outage(minutes: float = 10.0, rate: float = 500.0, baseline_minutes: Optional[float] = None,
               parallel: int = 2, down: str = "refuse", drain_timeout: Optional[float] = None,
               progress: Callable[[str], None] = lambda message: None, keep_logs: bool = True) -> OutageResults:
    """Run the three modes as child processes, at most ``parallel`` at a time; collect what they report."""
    if baseline_minutes is None:
        baseline_minutes = min(minutes, 2.0)
    if drain_timeout is None:
        drain_timeout = max(120.0, minutes * 30.0)
    work = tempfile.mkdtemp(prefix="o2audit-outage-")
    durations = {SPOOL: minutes, DROP: minutes, BASELINE: baseline_minutes}
    # The longest first; the short baseline shares a slot with the second long one.
    order = [SPOOL, BASELINE, DROP] if parallel < 3 else [SPOOL, DROP, BASELINE]
    runs = {mode: ModeRun(mode, durations[mode], log_path=os.path.join(work, f"{mode}.log")) for mode in MODES}
    waiting = list(order)
    running: List[Tuple[str, subprocess.Popen[str], threading.Thread, IO[str]]] = []
    began = time.monotonic()
    try:
        while waiting or running:
            while waiting and len(running) < parallel:
                mode = waiting.pop(0)
                spool_dir = os.path.join(work, f"spool-{mode}")
                log = open(runs[mode].log_path, "w", encoding="utf-8")  # noqa: SIM115 - closed when the child ends
                command = [sys.executable, os.path.abspath(__file__), "child", "--mode", mode,
                           "--minutes", str(durations[mode]), "--rate", str(rate), "--spool-dir", spool_dir,
                           "--down", down, "--drain-timeout", str(drain_timeout)]
                env = dict(os.environ)
                env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH", "")) if p)
                proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
                reader = threading.Thread(target=_read_child, args=(proc, runs[mode], progress), daemon=True)
                reader.start()
                running.append((mode, proc, reader, log))
                progress(f"{mode}: started ({durations[mode]:g} min at {rate:g} spans/s, sink down: {down})")
            time.sleep(0.5)
            for entry in list(running):
                mode, proc, reader, log = entry
                if proc.poll() is None:
                    continue
                reader.join(10)
                log.close()
                runs[mode].returncode = proc.returncode
                _scan_log(runs[mode])
                with open(os.path.join(work, f"samples-{mode}.json"), "w", encoding="utf-8") as handle:
                    json.dump({"start": runs[mode].start, "samples": runs[mode].samples,
                               "outage_end": runs[mode].outage_end, "done": runs[mode].done}, handle)
                running.remove(entry)
                progress(f"{mode}: finished (exit {proc.returncode})")
    finally:
        for _mode, proc, _reader, log in running:
            proc.kill()
            proc.wait()
            log.close()
        for mode in MODES:
            shutil.rmtree(os.path.join(work, f"spool-{mode}"), ignore_errors=True)
        if not keep_logs:
            shutil.rmtree(work, ignore_errors=True)
    return OutageResults(minutes, baseline_minutes, rate, down, parallel, time.monotonic() - began, runs,
                         work if keep_logs else "")


# ====================================================================== tables
def _f(value: float, digits: int = 1) -> str:
    return f"{value:,.{digits}f}"


def outage_sections(results: OutageResults) -> List[Any]:
    """The outage tables (``bench_report.Section`` objects)."""
    from bench_report import Section, fmt_ratio, verdict

    runs = results.runs
    base = runs[BASELINE]
    base_peak = base.peak_rss_mb() if base.ok else float("nan")
    memory = Section(
        f"(d) Memory while the sink is down: {results.minutes:g} min at {results.rate:g} SERVER spans/s",
        headers=["mode", "min", "spans/s", "peak RSS MB", "vs (iii)", "HWM MB", "RSS @ref MB", "RSS end MB",
                 "growth MB/min (ends / fit)", "held in memory", "spool MB", "CPU %", "bounded"],
    )
    for mode in MODES:
        run = runs[mode]
        if not run.ok:
            memory.rows.append([MODE_LABELS[mode], f"{run.minutes:g}", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                                "-", f"FAILED (exit {run.returncode}, log {run.log_path})"])
            continue
        peak = run.peak_rss_mb()
        bounded = run.growth_fit() <= GROWTH_LIMIT_MB_PER_MIN and run.growth_endpoints() <= GROWTH_LIMIT_MB_PER_MIN
        memory.rows.append([
            MODE_LABELS[mode], f"{run.minutes:g}", _f(run.rate(), 0), _f(peak), fmt_ratio(peak / base_peak),
            _f(run.hwm_outage_mb()), _f(run.rss_at(run.reference_t())), _f(run.rss_end_mb()),
            f"{run.growth_endpoints():+.2f} / {run.growth_fit():+.2f}",
            f"{run.max_in_memory():,}" if mode != BASELINE else "-",
            _f(run.max_spool_mb()) if mode == SPOOL else "-", _f(run.cpu_percent()),
            verdict(bounded),
        ])
    ref_note = "1 min" if results.minutes * 60 > 120 else "half-way"
    memory.notes = [
        f"Each mode is its own child process: a real TracerProvider, otel_o2audit.install(provider, endpoint="
        f"http://127.0.0.1:<port>, publish_interval={PUBLISH_INTERVAL:g}, retry_initial_backoff="
        f"{RETRY_INITIAL_BACKOFF:g}, ...; the other settings at their defaults: batch 500, "
        "O2_AUDIT_MAX_QUEUE_SIZE 10000, retry window 300 s, spool fsync 1 s), fed real SERVER spans (FastAPI "
        "instrumentation attributes, 1 in 9 failing with an exception event), each request in its own "
        f"contextvars.Context, paced on perf_counter deadlines (10 ms tick). Sink down = "
        + ("the port is bound but nothing listens: every connection is refused."
           if results.down == "refuse" else "a receiver answering 503 to every POST."),
        "peak RSS = highest VmRSS sampled (every second) while the sink was down; vs (iii) = that peak over the "
        "baseline's; HWM = the kernel's VmHWM at the end of the outage (peak between samples too). "
        f"growth = VmRSS change per minute from {ref_note} to the end of the outage: between the two end points, "
        "and the least-squares slope over every sample in that window; bounded = both at most "
        f"{GROWTH_LIMIT_MB_PER_MIN:g} MB/min. held in memory = most records in the intake, the store and in flight "
        "in any sample; spool MB = largest size of the spool directory on disk; CPU % = all threads of the "
        "child over the outage, percent of one core.",
        f"The modes ran at most {results.parallel} at a time (2 cores): the baseline ran "
        f"{results.baseline_minutes:g} min (the same load; it holds no state that grows, see its slope) in the "
        f"slot before (ii), so the whole run fits in {results.wall_s / 60:.1f} min of wall time. All three children "
        "import otel_o2audit, so the ratio compares state, not code; the import itself costs "
        + (f"{(base.start['rss_imported_kb'] - base.start['rss_bare_kb']) / _MB:.1f} MB "
           f"(bare interpreter {base.start['rss_bare_kb'] / _MB:.1f} MB, with the SDK, the package and "
           f"its dependencies {base.start['rss_imported_kb'] / _MB:.1f} MB)."
           if base.start else "(not measured)."),
    ]
    sections = [memory]

    # ---- what the pipeline did during the outage
    detail = Section(
        "(d) During the outage: stats() at its end, and how the collector worked",
        headers=["mode", "spans", "captured", "published", "dropped", "lost", "spooled", "store appends/s",
                 "records/append", "max lag ms", "WARNING+ log lines", "retries", "longest backoff s"],
    )
    for mode in (SPOOL, DROP):
        run = runs[mode]
        if not run.ok:
            continue
        counts = run.stats_at_end()
        adds, per_add = run.adds_per_second()
        logs = sum(v for k, v in run.log_counts.items() if k != "Traceback")
        detail.rows.append([MODE_LABELS[mode], f"{run.outage_end['sent']:,}", f"{counts['captured']:,}",
                            f"{counts['published']:,}", f"{counts['dropped']:,}", f"{counts['lost']:,}",
                            f"{counts['spooled']:,}", _f(adds), _f(per_add, 2),
                            _f(run.outage_end["max_lag_s"] * 1000, 0), f"{logs:,}", f"{len(run.backoffs):,}",
                            _f(max(run.backoffs), 2) if run.backoffs else "-"])
    detail.notes = [
        "store appends/s = calls of the store's add() by the collector thread (a counting wrapper around the "
        "store's method); records/append = records per call. spooled counts only what overflow or shutdown put "
        "on disk (as the README defines it), not the records the collector writes to the spool. max lag = how "
        "far the load loop fell behind its schedule at worst. retries / longest backoff = the client's "
        "'attempt N ... failed; retrying in X s' log lines (INFO) over the whole run, and the longest wait "
        "among them (the README promises attempts at most 30 s apart).",
    ]
    sections.append(detail)

    # ---- the recovery
    recovery = Section(
        "(e) The sink comes back (same port, answers 200 with OpenObserve's counts); the load goes on",
        headers=["mode", "backlog", "first ack s", "drained s", "drain rec/s", "peak RSS in drain MB",
                 "received distinct", "captured-lost-rejected-expired", "duplicates", "spans = captured+dropped",
                 "spool left B", "accounted"],
    )
    for mode in (SPOOL, DROP):
        run = runs[mode]
        if not run.ok:
            recovery.rows.append([MODE_LABELS[mode], "-", "-", "-", "-", "-", "-", "-", "-", "-", "-",
                                  f"FAILED (exit {run.returncode})"])
            continue
        done = run.done
        distinct, expected, equal = run.accounted()
        sent, total, spans_equal = run.spans_accounted()
        drained = done.get("drained_s")
        backlog = done["backlog"] - done["settled_at_up"]
        duplicates = (done.get("received") or {}).get("duplicates", 0)
        recovery.rows.append([
            MODE_LABELS[mode], f"{backlog:,}",
            _f(done["first_delivery_s"], 1) if done.get("first_delivery_s") is not None else "never",
            _f(drained, 1) if drained is not None else f"> {done['drain_timeout_s']:g}",
            _f(backlog / drained, 0) if drained else "-", _f(run.peak_drain_mb()),
            f"{distinct:,}", f"{expected:,}", f"{duplicates:,}", f"{sent:,} = {total:,}",
            f"{done.get('spool_bytes_after', 0):,}" if mode == SPOOL else "-",
            verdict(equal and spans_equal and drained is not None),
        ])
    recovery.notes = [
        "backlog = records captured but not yet settled when the sink came back; first ack = seconds until the "
        "first batch was acknowledged (the sender notices the recovery at its next retry: backoff doubles from "
        f"{RETRY_INITIAL_BACKOFF:g} s to at most 30 s, +-20 % jitter; after a 300 s retry window runs out, a "
        "spooled batch waits 30 s); drained = seconds until every record captured before the recovery was "
        "settled (published, or accounted as lost/rejected/expired), with the load still running; drain rec/s "
        "= backlog / drained.",
        "Then the load stops and provider.shutdown() publishes the rest. accounted = PASS when the receiver's "
        "distinct event_ids equal captured - lost - rejected - expired from stats(), every span produced is "
        "captured, dropped or skipped, and the backlog drained in time. duplicates = records received more than "
        "once (at-least-once replay).",
    ]
    spool_run = runs[SPOOL]
    if spool_run.ok and (spool_run.done.get("final_stats") or {}).get("replayed"):
        recovery.notes.append(
            f"replayed = {spool_run.done['final_stats']['replayed']:,} in mode (i), although its spool directory "
            "was new and no other process wrote to it: the README defines replayed as 'published from spool "
            "files of an earlier run or a dead worker', but the spool also marks batches read from this "
            "process's own segments that rolled over (every 8 MB) as replays."
        )
    sections.append(recovery)

    stats_lines = []
    for mode in (SPOOL, DROP):
        run = runs[mode]
        if run.ok:
            stats_lines.append(f"{mode:8s} end of outage: {json.dumps(run.stats_at_end())}")
            stats_lines.append(f"{mode:8s} final:         {json.dumps(run.done.get('final_stats'))}")
            stats_lines.append(f"{mode:8s} receiver:      {json.dumps(run.done.get('received'))}")
    failures = [f"{m}: exit {runs[m].returncode}; log {runs[m].log_path}: " + " | ".join(runs[m].log_tail)
                for m in MODES if not runs[m].ok]
    raw = Section("(d)/(e) otel_o2audit.stats() and the receiver's totals")
    raw.code = ["\n".join(stats_lines + failures)]
    if results.work:
        raw.notes = [f"Every child's log and its per-second samples (JSON) were kept in {results.work}."]
    sections.append(raw)
    return sections


def summary_lines(results: OutageResults) -> List[str]:
    """The headline numbers in sentences."""
    runs = results.runs
    lines = []
    base = runs[BASELINE]
    if not all(runs[m].ok for m in MODES):
        return ["Some modes failed: see the tables."]
    bp = base.peak_rss_mb()
    for mode in (SPOOL, DROP):
        run = runs[mode]
        distinct, expected, equal = run.accounted()
        drained = run.done.get("drained_s")
        drain_text = f"in {drained:.1f} s" if drained is not None else "NOT in time"
        lines.append(
            f"{MODE_LABELS[mode]}: peak RSS {run.peak_rss_mb():.1f} MB = {run.peak_rss_mb() / bp:.2f}x the "
            f"baseline's {bp:.1f} MB, growth {run.growth_fit():+.2f} MB/min after the reference point; "
            f"drained {drain_text}; received {distinct:,} "
            f"distinct records of {expected:,} expected ({'all accounted' if equal else 'MISMATCH'})."
        )
    return lines


# ====================================================================== command line
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    child = sub.add_parser("child", help="one mode (internal)")
    child.add_argument("--mode", choices=MODES, required=True)
    child.add_argument("--minutes", type=float, default=10.0)
    child.add_argument("--rate", type=float, default=500.0)
    child.add_argument("--spool-dir", required=True)
    child.add_argument("--down", choices=("refuse", "503"), default="refuse")
    child.add_argument("--drain-timeout", type=float, default=300.0)
    child.add_argument("--seed", type=int, default=5)
    receiver = sub.add_parser("receiver", help="the loopback sink (internal)")
    receiver.add_argument("--down", choices=("refuse", "503"), default="refuse")
    parser.add_argument("--minutes", type=float, default=10.0, help="outage length (default 10)")
    parser.add_argument("--rate", type=float, default=500.0, help="SERVER spans per second (default 500)")
    parser.add_argument("--down", choices=("refuse", "503"), default="refuse", help="how the sink is down")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """``child`` / ``receiver`` (internal), or a whole run printed to the terminal."""
    args = _parser().parse_args(argv)
    if args.command == "child":
        return child_main(args)
    if args.command == "receiver":
        receiver_main(args.down)
        return 0
    sys.path.insert(0, HERE)
    from bench_report import Report

    began = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{time.monotonic() - began:6.1f}s] {message}", file=sys.stderr, flush=True)

    results = run_outage(args.minutes, args.rate, down=args.down, progress=progress)
    print(Report("otel-o2audit: outage benchmark", summary_lines(results), outage_sections(results)).text())
    return 0 if all(math.isfinite(r.peak_rss_mb()) for r in results.runs.values() if r.ok) else 1


if __name__ == "__main__":
    sys.exit(main())
