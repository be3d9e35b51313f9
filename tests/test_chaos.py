"""Chaos: a real application under steady traffic while OpenObserve misbehaves, and while the application is
stopped or killed.

``tests/chaosapp.py`` runs under ``opentelemetry-instrument uvicorn`` (zero-code, ``O2_AUDIT_ENABLED=true``, a
spool directory in ``tmp_path``) or gunicorn with ``UvicornWorker``; a thread drives bounded traffic
(:class:`chaoskit.Traffic`) while the loopback FakeOpenObserve refuses connections, answers 503/429 storms,
hangs past the timeout, rejects records inside a 200 or returns counts that do not add up.

Each receiver scenario ends with the books balanced: distinct records delivered plus records the application
accounted for (``rejected + lost + expired + dropped`` from its ``/__stats``) equals records produced (answered
requests). After a SIGTERM every answered request reaches the receiver (after a restart on the same spool);
after a SIGKILL every one outside the exposure window does, and the window is measured and printed (run with
``-s`` to see the numbers). Everything is bounded by deadlines; subprocesses are killed at teardown.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, Iterator, Optional, Set, Tuple

import pytest
from chaoskit import (
    CHAOS_APP,
    Accounting,
    Traffic,
    accounting,
    app_stats,
    chaos_env,
    index_by_path,
    segment_pid,
    segments,
    side_records,
    wait_for,
)
from o2receiver import FakeOpenObserve
from procs import AppProcess, Launcher, child_env

#: The SIGKILL exposure the tests accept. The README documents about 0.25 s (the collector writes what it captured
#: to the spool every 0.25 s; measured: up to ~0.23 s); 0.5 s leaves one tick of scheduling slack on a busy machine
#: and stays well inside the issue's promise (at most the last second).
MAX_EXPOSURE = 0.5


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    pool = Launcher(tmp_path)
    try:
        yield pool
    finally:
        pool.cleanup()


def start_uvicorn(launcher: Launcher, receiver: FakeOpenObserve, spool: Path, **env: str) -> AppProcess:
    return launcher.uvicorn(child_env(chaos_env(receiver, spool, **env)), CHAOS_APP).wait_ready()


def base(app: AppProcess) -> str:
    return app.url("")


def settled(receiver: FakeOpenObserve, app: AppProcess, traffic: Traffic, timeout: float = 30.0) -> Accounting:
    """Wait until the application has settled every record it captured, then balance the books."""
    produced = len(traffic.answered())
    last: Dict[str, Dict[str, int]] = {}

    def done() -> bool:
        stats = app_stats(base(app))
        last["stats"] = stats
        finished = stats["published"] + stats["rejected"] + stats["lost"] + stats["expired"]
        return stats["captured"] + stats["dropped"] == produced and finished == stats["captured"]

    wait_for(done, timeout, lambda: f"the app to settle {produced} records; stats {last.get('stats')}{app.tail()}")
    return accounting(receiver, traffic, last["stats"])


def check_books(acc: Accounting, app: AppProcess, name: str) -> None:
    print(f"\n[chaos {name}] {acc.summary()}")
    assert acc.split_paths == [], f"one request, several records: {acc.split_paths[:5]}"
    assert acc.unexpected == set(), f"records for requests never answered: {sorted(acc.unexpected)[:5]}"
    assert acc.balanced, f"delivered + accounted != produced: {acc.summary()}{app.tail()}"
    assert acc.stats["captured"] == len(acc.produced), acc.summary()


def run_traffic(app: AppProcess, tag: str, count: int = 400, interval: float = 0.004) -> Traffic:
    return Traffic(base(app), tag, count=count, interval=interval).start()


# --------------------------------------------------------------------------------------------------
# OpenObserve misbehaves
# --------------------------------------------------------------------------------------------------

Fault = Callable[[FakeOpenObserve, Traffic], None]


def refuse_for_a_while(receiver: FakeOpenObserve, traffic: Traffic) -> None:
    traffic.wait_answered(80)
    receiver.stop()
    traffic.wait_answered(230)
    receiver.restart()


def storms(receiver: FakeOpenObserve, traffic: Traffic) -> None:
    traffic.wait_answered(80)
    receiver.respond_status(503, times=3)
    receiver.respond_status(429, times=2, retry_after="1")
    receiver.respond_status(503, times=1, retry_after="1")


def hang_past_timeout(receiver: FakeOpenObserve, traffic: Traffic) -> None:
    traffic.wait_answered(80)
    receiver.hang(2.0, times=2)


def reject_some(receiver: FakeOpenObserve, traffic: Traffic) -> None:
    traffic.wait_answered(80)
    receiver.reject_records(3, times=2)


def mismatch_counts(receiver: FakeOpenObserve, traffic: Traffic) -> None:
    traffic.wait_answered(80)
    receiver.mismatch_counts(2, times=2)  # a batch retried once, mismatched again: 2 lost
    receiver.mismatch_counts(3, times=1)  # the next batch recovers on its retry: duplicates only


SCENARIOS: Dict[str, Tuple[Fault, Dict[str, str]]] = {
    # outage shorter than the retry window: the retries in flight carry the batch through
    "refuse": (refuse_for_a_while, {}),
    # outage longer than the retry window: the spool keeps the batch (pause shortened by the app's test hook)
    "refuse-past-window": (refuse_for_a_while, {"O2_AUDIT_RETRY_MAX_ELAPSED": "0.4", "CHAOS_RETRY_LATER": "0.5"}),
    "503-429-storms": (storms, {}),
    "hang": (hang_past_timeout, {}),
    "reject": (reject_some, {}),
    "mismatch": (mismatch_counts, {}),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_receiver_chaos_balances_the_books(launcher: Launcher, receiver: FakeOpenObserve, tmp_path: Path,
                                           name: str) -> None:
    fault, env = SCENARIOS[name]
    spool = tmp_path / "spool"
    app = start_uvicorn(launcher, receiver, spool, **env)
    traffic = run_traffic(app, name.replace("-", "_"))
    fault(receiver, traffic)
    traffic.join()
    assert traffic.errors() == [], f"requests failed: {[s.error for s in traffic.errors()][:3]}{app.tail()}"

    acc = settled(receiver, app, traffic)
    if name == "hang":
        # The hung requests finish later and store their copy: duplicates, never new records.
        receiver.wait_until(lambda: all(r.finished for r in receiver.requests_log), timeout=10,
                            description="the hung requests to finish")
        acc = accounting(receiver, traffic, acc.stats)
    check_books(acc, app, name)
    stats = acc.stats

    if name in ("refuse", "refuse-past-window", "503-429-storms", "hang"):
        assert acc.missing == set(), f"{len(acc.missing)} records never delivered{app.tail()}"
        assert stats["lost"] == 0
        assert stats["rejected"] == 0
    if name == "refuse-past-window":
        assert "kept in the spool" in app.stderr(), "the outage outlasted the retry window: the spool kept batches"
    if name == "503-429-storms":
        assert receiver.pending_behaviours == 0
        assert stats["retried"] > 0
        log = receiver.ingestion_requests()
        for previous, following in zip(log, log[1:]):
            if previous.status in (429, 503) and previous.response_headers.get("Retry-After") == "1":
                assert previous.answered_at is not None
                gap = following.time - previous.answered_at
                assert gap >= 0.95, f"Retry-After: 1 not honoured: next attempt after {gap:.3f}s"
    if name == "hang":
        assert stats["retried"] > 0
        print(f"[chaos hang] duplicates stored by the hung requests: {acc.duplicates}")
    if name == "reject":
        assert stats["rejected"] == 6
        assert stats["lost"] == 0
        assert len(acc.missing) == 6
        kept = [r["http_path"] for r in side_records(spool, "rejected")]
        rejected_batches = [r for r in receiver.ingestion_requests() if r.behaviour == "reject last 3"]
        assert len(rejected_batches) == 2
        assert kept == [x["http_path"] for r in rejected_batches for x in r.records or []], (
            "each partly rejected batch is kept whole under rejected/")
        assert acc.missing <= set(kept)
        resent = [r for r in receiver.ingestion_requests() if r not in rejected_batches
                  and {x["http_path"] for x in r.records or []} & set(kept)]
        assert resent == [], "a partly rejected batch was re-sent"
    if name == "mismatch":
        assert stats["lost"] == 2
        assert stats["rejected"] == 0
        assert len(acc.missing) == 2
        lost_kept = {r["http_path"] for r in side_records(spool, "rejected")}
        assert acc.missing <= lost_kept, "the batch whose counts did not add up is kept under rejected/"
        print(f"[chaos mismatch] duplicates from the recovered retry: {acc.duplicates}")


# --------------------------------------------------------------------------------------------------
# the application is stopped or killed mid-traffic
# --------------------------------------------------------------------------------------------------


def wait_delivered(receiver: FakeOpenObserve, traffic: Traffic, paths: Set[str], timeout: float,
                   app: Optional[AppProcess] = None) -> Dict[str, Counter[str]]:
    def all_there() -> bool:
        return paths <= set(index_by_path(receiver.records_for(), traffic.prefix))

    wait_for(all_there, timeout, lambda: (
        f"{len(paths - set(index_by_path(receiver.records_for(), traffic.prefix)))} of {len(paths)} records to "
        f"reach the receiver" + (app.tail() if app else "")))
    return index_by_path(receiver.records_for(), traffic.prefix)


def test_sigterm_mid_traffic_then_restart_delivers_everything(launcher: Launcher, receiver: FakeOpenObserve,
                                                              tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    app = start_uvicorn(launcher, receiver, spool)
    traffic = run_traffic(app, "sigterm", count=800)
    traffic.wait_answered(100)
    receiver.stop()  # what is pending at the signal cannot be published: the spool must keep it
    traffic.wait_answered(250)
    app.send_signal(signal.SIGTERM)
    status = app.wait_exit(30)
    traffic.join()
    assert status == -signal.SIGTERM, f"exit status {status}{app.tail()}"
    produced = {s.path for s in traffic.answered()}
    assert len(produced) >= 250
    assert segments(spool), "records not yet published stay in the spool"
    assert "stay in the spool" in app.stderr(), f"the shutdown says where the records are{app.tail()}"

    receiver.restart()
    again = start_uvicorn(launcher, receiver, spool)
    wait_delivered(receiver, traffic, produced, 30, again)
    acc = accounting(receiver, traffic, app_stats(base(again)))
    print(f"\n[chaos sigterm] {acc.summary()}")
    assert acc.split_paths == []
    assert acc.unexpected == set(), "records for requests that never got an answer"
    assert acc.stats["replayed"] > 0, "the restart replayed the spool"
    assert acc.stats["lost"] == 0


SIGKILL_CASES = {
    # OpenObserve up, nothing published before the kill (long interval, big batches): the collector writes
    # its intake every 0.25 s, so the records of the last tick are the exposure.
    "fsync0-receiver-up": ({"O2_AUDIT_SPOOL_FSYNC_INTERVAL": "0"}, True),
    "fsync-default-receiver-up": ({}, True),
    # OpenObserve down: a backlog of at least a batch wakes the collector on every span.
    "fsync-default-receiver-down": ({}, False),
}


@pytest.mark.parametrize("case", list(SIGKILL_CASES))
def test_sigkill_mid_traffic_then_restart_loses_at_most_the_exposure_window(
        launcher: Launcher, receiver: FakeOpenObserve, tmp_path: Path, case: str) -> None:
    extra, receiver_up = SIGKILL_CASES[case]
    spool = tmp_path / "spool"
    env = {"O2_AUDIT_BATCH_SIZE": "1000", "O2_AUDIT_PUBLISH_INTERVAL": "600", **extra} if receiver_up else extra
    app = start_uvicorn(launcher, receiver, spool, **env)
    traffic = run_traffic(app, case.replace("-", "_"), count=2000, interval=0.002)
    traffic.wait_answered(100)
    if not receiver_up:
        receiver.stop()  # nothing is published after this: every record must come back from the spool
    traffic.wait_answered(600)
    killed_at = time.monotonic()
    os.killpg(app.pid, signal.SIGKILL)
    assert app.wait_exit(10) == -signal.SIGKILL
    traffic.join()
    answered = traffic.answered()
    produced = {s.path for s in answered}
    dead = app.pid
    published_before = len(index_by_path(receiver.records_for(), traffic.prefix))

    receiver.restart()
    again = start_uvicorn(launcher, receiver, spool, **env)
    # The dead process's files are adopted, replayed, acknowledged and deleted.
    wait_for(lambda: not [p for p in segments(spool) if segment_pid(p) == dead], 30,
             lambda: f"the killed process's spool files to be replayed: {[p.name for p in segments(spool)]}"
                     f"{again.tail()}")
    acc = accounting(receiver, traffic, app_stats(base(again)))
    by_path = {s.path: s for s in answered}
    ages = sorted(killed_at - by_path[p].answered_at for p in acc.missing)  # type: ignore[operator]
    recent = [s for s in answered if s.answered_at is not None and killed_at - s.answered_at <= 0.5]
    recent_missing = [s for s in recent if s.path in acc.missing]
    span = (answered[-1].answered_at or 0) - (answered[0].answered_at or 0)
    print(f"\n[chaos sigkill {case}] produced={len(produced)} (~{len(answered) / max(span, 1e-9):.0f} req/s), "
          f"published before the kill={published_before}, missing after restart={len(acc.missing)}, "
          f"window={ages[-1] if ages else 0.0:.3f}s (youngest missing {ages[0] if ages else 0.0:.3f}s); "
          f"last 0.5 s: {len(recent_missing)} of {len(recent)} missing; duplicates={acc.duplicates}, "
          f"unexpected={len(acc.unexpected)}; restart stats {acc.stats}")
    assert acc.split_paths == []
    outside = [round(a, 3) for a in ages if a > MAX_EXPOSURE]
    assert outside == [], (f"{len(outside)} records answered more than {MAX_EXPOSURE}s before the SIGKILL never "
                           f"arrived (ages {outside[:10]}){again.tail()}")
    assert acc.stats["replayed"] + published_before >= len(produced) - len(acc.missing), acc.summary()


# --------------------------------------------------------------------------------------------------
# gunicorn, two workers, one spool directory
# --------------------------------------------------------------------------------------------------


def unacknowledged(spool: Path) -> Dict[Path, int]:
    """Segment files holding records not yet acknowledged (ack offset below the size): path -> bytes."""
    out = {}
    for path in segments(spool):
        ack = path.with_suffix(".ack")
        acked = int(ack.read_text() or 0) if ack.exists() else 0
        if acked < path.stat().st_size:
            out[path] = path.stat().st_size - acked
    return out


def start_gunicorn(launcher: Launcher, receiver: FakeOpenObserve, spool: Path, **env: str) -> AppProcess:
    return launcher.gunicorn(child_env(chaos_env(receiver, spool, **env)), CHAOS_APP, workers=2).wait_ready(40)


def fresh_traffic(app: AppProcess, tag: str, count: int) -> Traffic:
    return Traffic(base(app), tag, count=count, interval=0.004, fresh=True).start()


def test_gunicorn_two_workers_shared_spool_sigterm(launcher: Launcher, receiver: FakeOpenObserve,
                                                   tmp_path: Path) -> None:
    spool = tmp_path / "spool"

    # 1. OpenObserve up: SIGTERM mid-traffic publishes every worker's records, once.
    app = start_gunicorn(launcher, receiver, spool)
    traffic = fresh_traffic(app, "gunicorn_up", 300)
    traffic.wait_answered(150)
    app.send_signal(signal.SIGTERM)
    assert app.wait_exit(40) == 0, app.tail()
    traffic.join()
    produced = {s.path for s in traffic.answered()}
    workers = {s.pid for s in traffic.answered() if s.pid is not None}
    assert len(workers) == 2, f"both workers served: {workers}"
    delivered = wait_delivered(receiver, traffic, produced, 10, app)
    acc = Accounting(produced, delivered)
    print(f"\n[chaos gunicorn up] produced={len(produced)} workers={sorted(workers)} "
          f"duplicates={acc.duplicates} unexpected={len(acc.unexpected)}")
    assert acc.split_paths == []
    assert acc.duplicates == 0, "a record was sent twice"
    assert unacknowledged(spool) == {}, "everything was published: nothing unacknowledged may stay in the spool"

    # 2. OpenObserve down for a whole run: SIGTERM leaves every record in the workers' spool files ...
    receiver.stop()
    down = start_gunicorn(launcher, receiver, spool)
    traffic = fresh_traffic(down, "gunicorn_down", 300)
    traffic.wait_answered(150)
    down.send_signal(signal.SIGTERM)
    assert down.wait_exit(40) == 0, down.tail()
    traffic.join()
    produced = {s.path for s in traffic.answered()}
    workers = {s.pid for s in traffic.answered() if s.pid is not None}
    left = unacknowledged(spool)
    owners = {segment_pid(p) for p in left}
    assert workers <= owners, f"each worker's records stay in its own files: workers {workers}, files {owners}"
    told = down.stderr().count("stay in the spool")

    # ... and the next run (OpenObserve back) replays them: each exactly once, no file sent by two processes.
    receiver.restart()
    replay = start_gunicorn(launcher, receiver, spool)
    wait_for(lambda: not [p for p in segments(spool) if segment_pid(p) in owners], 30,
             lambda: f"the previous run's files to be replayed: {[p.name for p in segments(spool)]}{replay.tail()}")
    delivered = wait_delivered(receiver, traffic, produced, 10, replay)
    acc = Accounting(produced, delivered)
    counts = [sum(events.values()) for events in delivered.values()]
    print(f"[chaos gunicorn replay] produced={len(produced)} workers={sorted(workers)} files={len(left)} "
          f"duplicates={acc.duplicates} max copies={max(counts)} unexpected={len(acc.unexpected)}")
    assert acc.split_paths == []
    assert acc.duplicates == 0, f"{acc.duplicates} records replayed more than once (a file sent by two processes?)"
    replay.send_signal(signal.SIGTERM)
    assert replay.wait_exit(40) == 0, replay.tail()
    assert unacknowledged(spool) == {}, "everything was replayed and acknowledged"
    # Under gunicorn's UvicornWorker the worker dies by the re-raised SIGTERM: unless the audit shuts its
    # processor down before that, the spool is never closed and nobody says where the records went.
    assert told >= len(workers), (
        f"{len(workers)} workers stopped with unpublished records but {told} said they stay in the spool "
        f"(processor.shutdown()/spool close never ran in the gunicorn workers){down.tail()}")


def test_gunicorn_sigkilled_worker_files_are_adopted(launcher: Launcher, receiver: FakeOpenObserve,
                                                     tmp_path: Path) -> None:
    """One worker is SIGKILLed mid-traffic (what gunicorn's worker timeout does); gunicorn starts a new one. The
    dead worker's spool file is adopted (by the new worker at its start or by the sibling's 10 s rescan) and
    replayed; only the dead worker's last records, inside the exposure window, may be missing."""
    spool = tmp_path / "spool"
    # Nothing is published before the end: everything of the dead worker must come back from its file.
    app = start_gunicorn(launcher, receiver, spool, O2_AUDIT_BATCH_SIZE="1000", O2_AUDIT_PUBLISH_INTERVAL="600")
    traffic = Traffic(base(app), "gunicorn_kill", count=400, interval=0.004, fresh=True, stop_on_error=False)
    traffic.start()
    traffic.wait_answered(200)
    victim = traffic.answered()[-1].pid
    assert victim is not None
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    traffic.join()
    wait_for(lambda: not [p for p in segments(spool) if segment_pid(p) == victim], 30,
             lambda: f"the killed worker's file to be adopted and replayed: {[p.name for p in segments(spool)]}"
                     f"{app.tail()}")
    app.send_signal(signal.SIGTERM)
    assert app.wait_exit(40) == 0, app.tail()

    answered = traffic.answered()
    acc = accounting(receiver, traffic)
    served_by = {s.path: s for s in answered}
    survivors_missing = [p for p in acc.missing if served_by[p].pid != victim]
    ages = sorted(killed_at - served_by[p].answered_at for p in acc.missing)  # type: ignore[operator]
    by_victim = sum(1 for s in answered if s.pid == victim)
    print(f"\n[chaos gunicorn worker SIGKILL] produced={len(answered)} (victim served {by_victim}), "
          f"failed requests={len(traffic.errors())}, missing={len(acc.missing)} window="
          f"{ages[-1] if ages else 0.0:.3f}s, duplicates={acc.duplicates}, unexpected={len(acc.unexpected)}")
    assert acc.split_paths == []
    assert survivors_missing == [], f"records of the surviving workers missing: {survivors_missing[:5]}"
    outside = [round(a, 3) for a in ages if a > MAX_EXPOSURE]
    assert outside == [], f"records of the killed worker older than {MAX_EXPOSURE}s never arrived: {outside}"
    assert unacknowledged(spool) == {}
