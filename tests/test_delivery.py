"""Delivery through the processor: outages, restarts, shutdown with a spool, and the overflow policies.

Real SDK TracerProviders with ``otel_o2audit.install(...)``, FastAPI apps instrumented with the contrib
instrumentation and driven by TestClient, and the loopback FakeOpenObserve. Waits are conditions with
deadlines.

Note on timing: after a batch's retry window runs out the spool keeps it and the processor waits before
trying again, backing off from ``retry_initial_backoff`` up to ``otel_o2audit.processor._RETRY_LATER`` (30 s).
Tests that need a quick automatic retry also lower that cap with monkeypatch; ``force_flush()`` always
retries at once (and must not re-send a kept batch in a loop until its deadline).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List

import pytest
from chaoskit import segments, side_records
from fastapi.testclient import TestClient
from inproc import Counters, Harness, make_app, wait_until
from o2receiver import FakeOpenObserve

from otel_o2audit import processor as processor_module


@pytest.fixture
def counters() -> Counters:
    return Counters()


def settings(spool: Any = None, **overrides: Any) -> Dict[str, Any]:
    """The brief's fast settings; ``spool`` (a path) turns the durable spool on."""
    values: Dict[str, Any] = {"publish_interval": 0.2, "retry_initial_backoff": 0.05, "retry_max_elapsed": 1,
                              "timeout": 0.5, "shutdown_timeout": 2, "batch_size": 20}
    if spool is not None:
        values["spool_dir"] = str(spool)
    values.update(overrides)
    return values


def get_many(client: TestClient, count: int, org: str = "acme", start: int = 0) -> None:
    for i in range(start, start + count):
        assert client.get(f"/api/{org}/things/{i}").status_code == 200


def messages(caplog: pytest.LogCaptureFixture, text: str) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == "otel_o2audit" and text in r.getMessage()]


def assert_each_once(records: List[Dict[str, Any]], paths: List[str]) -> None:
    by_event = Counter(r["event_id"] for r in records)
    twice = {e: n for e, n in by_event.items() if n > 1}
    assert not twice, f"delivered more than once: {twice}"
    assert sorted(r["http_path"] for r in records) == sorted(paths)


def paths(count: int, org: str = "acme", start: int = 0) -> List[str]:
    return [f"/api/{org}/things/{i}" for i in range(start, start + count)]


# --------------------------------------------------------------------------------------------------
# outages
# --------------------------------------------------------------------------------------------------


def test_outage_keeps_records_in_the_spool_and_retries_after_the_pause(
        receiver: FakeOpenObserve, harness: Harness, tmp_path: Path, counters: Counters,
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processor_module, "_RETRY_LATER", 0.5)
    provider = harness.provider()
    harness.install(provider, receiver, **settings(tmp_path))
    receiver.stop()
    with TestClient(make_app(provider)) as client:
        get_many(client, 10)
        wait_until(lambda: messages(caplog, "kept in the spool"), timeout=10,
                   message="the first batch to be kept in the spool after its retry window")
        # While the batch waits, records keep being captured (to disk).
        get_many(client, 20, start=10)
        wait_until(lambda: counters["captured"] == 30, timeout=5, message="30 records captured during the outage")
        assert counters["lost"] == 0
        assert counters["published"] == 0
        assert segments(tmp_path), "the records wait on disk"

        receiver.restart()
        records = receiver.wait_for_records(30, timeout=15)

    assert_each_once(records, paths(30))
    wait_until(lambda: counters["published"] == 30, timeout=5, message="30 records counted published")
    delta = counters.delta()
    assert (delta["lost"], delta["dropped"], delta["rejected"], delta["expired"]) == (0, 0, 0, 0), delta
    assert side_records(tmp_path, "rejected") == []


def test_outage_force_flush_retries_a_kept_batch_at_once(receiver: FakeOpenObserve, harness: Harness,
                                                         tmp_path: Path, counters: Counters,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    provider = harness.provider()
    processor = harness.install(provider, receiver, **settings(tmp_path))
    receiver.stop()
    with TestClient(make_app(provider)) as client:
        get_many(client, 12)
    wait_until(lambda: messages(caplog, "kept in the spool"), timeout=10, message="the batch to be kept")

    receiver.restart()
    started = time.monotonic()
    assert processor.force_flush(5000) is True
    assert time.monotonic() - started < 3, "force_flush retries at once, it does not wait for the pause"
    assert_each_once(receiver.records_for(), paths(12))
    assert counters["lost"] == 0


def test_shutdown_while_down_keeps_records_and_a_new_processor_replays_them(
        receiver: FakeOpenObserve, harness: Harness, tmp_path: Path, counters: Counters,
        caplog: pytest.LogCaptureFixture) -> None:
    first_provider = harness.provider()
    first = harness.install(first_provider, receiver, **settings(tmp_path))
    receiver.stop()
    with TestClient(make_app(first_provider)) as client:
        get_many(client, 10)
    wait_until(lambda: counters["captured"] == 10, timeout=5, message="10 records captured")
    first.shutdown(timeout_millis=500)

    assert counters["spooled"] == 10, counters.delta()
    assert counters["lost"] == 0
    assert segments(tmp_path), "the records stay in the spool"
    assert messages(caplog, "stay in the spool"), "the shutdown says where the records are"

    receiver.restart()
    second_provider = harness.provider()
    second = harness.install(second_provider, receiver, **settings(tmp_path))
    assert second is not first
    replayed = receiver.wait_for_records(10, timeout=10)
    assert_each_once(replayed, paths(10))
    wait_until(lambda: counters["replayed"] == 10, timeout=5, message="10 records counted replayed")

    with TestClient(make_app(second_provider)) as client:
        get_many(client, 3, start=10)
    assert second.force_flush(5000) is True
    records = receiver.records_for()
    assert_each_once(records, paths(13))
    assert [r["http_path"] for r in records[:10]] == paths(10), "the backlog is sent before newer records"
    assert counters["replayed"] == 10, "records of this run are not counted as replayed"
    second.shutdown()
    assert segments(tmp_path) == [], "everything acknowledged, nothing left on disk"


def test_413_split_then_outage_keeps_the_batch_in_the_spool(receiver: FakeOpenObserve, harness: Harness,
                                                            tmp_path: Path, counters: Counters) -> None:
    """The server answers 413 (the batch is split in halves), then both halves meet an outage (503 with a
    Retry-After beyond the retry window). Nothing was delivered and the outage is temporary: the spool must keep
    the batch for a later attempt, as it does for an unsplit batch, instead of counting it lost."""
    provider = harness.provider()
    processor = harness.install(provider, receiver, **settings(tmp_path, batch_size=4, publish_interval=60))
    receiver.respond_status(413)
    receiver.respond_status(503, times=2, retry_after="5")
    with TestClient(make_app(provider)) as client:
        get_many(client, 4)
    receiver.wait_for_requests(3, timeout=10)
    wait_until(lambda: receiver.pending_behaviours == 0, timeout=5, message="the scripted answers to be used")

    assert processor.force_flush(5000) is True
    assert counters["lost"] == 0, (
        f"{counters['lost']} records counted LOST after a 413 split met a temporary outage; the spool should "
        "have kept the batch (DeliveryReport.retry_later is dropped when the split reports are combined)")
    assert_each_once(receiver.records_for(), paths(4))
    assert side_records(tmp_path, "rejected") == []


def test_a_flush_does_not_resend_a_kept_batch_in_a_tight_loop(receiver: FakeOpenObserve, harness: Harness,
                                                                tmp_path: Path, counters: Counters,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """401 (wrong credentials: an operator fixes them) fails fast and is kept in the spool "to be tried again
    every 30 s". A flush (every SIGTERM, every force_flush) must not re-send the kept batch again and again until
    its deadline: that floods OpenObserve with POSTs and the log with warnings."""
    provider = harness.provider()
    processor = harness.install(provider, None, **settings(tmp_path, endpoint=receiver.url, user=receiver.user,
                                                           password="not-the-password", publish_interval=60))
    with TestClient(make_app(provider)) as client:
        get_many(client, 3)
    assert processor.force_flush(1000) is False
    sent = len(receiver.ingestion_requests())
    warnings = len(messages(caplog, "kept in the spool"))
    processor.shutdown(timeout_millis=300)
    assert counters["lost"] == 0, "the batch is kept, not lost"
    assert sent <= 5, (f"a 1 s flush POSTed the same kept batch {sent} times ({warnings} 'kept in the spool' "
                       "warnings): a kept batch is re-sent in a tight loop until the flush deadline")


# --------------------------------------------------------------------------------------------------
# overflow policies and the queue bound
# --------------------------------------------------------------------------------------------------


def fill_queue(receiver: FakeOpenObserve, client: TestClient, count: int) -> None:
    """``count`` requests whose batch is then stuck in a held ingestion request."""
    get_many(client, count)
    receiver.wait_until(lambda: any(r.state == "held" for r in receiver.ingestion_requests()), timeout=5,
                        description="the first batch to be held by the receiver")


HELD = {"timeout": 10, "retry_max_elapsed": 20}  # a held request stays in flight for the whole test


def test_drop_policy_is_the_default_without_a_spool(receiver: FakeOpenObserve, harness: Harness,
                                                    counters: Counters, caplog: pytest.LogCaptureFixture) -> None:
    provider = harness.provider()
    processor = harness.install(provider, receiver, **settings(max_queue_size=2, batch_size=2, **HELD))
    assert processor.exporter.config.overflow_policy == "drop"
    receiver.hold()
    with TestClient(make_app(provider)) as client:
        fill_queue(receiver, client, 2)
        started = time.monotonic()
        get_many(client, 3, start=2)
        assert time.monotonic() - started < 2, "drop does not make the request wait"
    assert counters["dropped"] == 3
    wait_until(lambda: messages(caplog, "DROPPED"), timeout=5, message="the first drop to be logged at once")

    receiver.release()
    assert processor.force_flush(5000) is True
    assert_each_once(receiver.records_for(), paths(2))
    assert counters["captured"] == 2
    processor.shutdown()
    logged = [int(m.split("otel-o2audit: ", 1)[1].split()[0]) for m in messages(caplog, "audit records DROPPED")]
    assert sum(logged) == 3, f"drops are logged rate-limited but all of them, by count: {logged}"


def test_block_policy_waits_then_drops(receiver: FakeOpenObserve, harness: Harness, counters: Counters,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("O2_AUDIT_OVERFLOW", "block")
    monkeypatch.setenv("O2_AUDIT_BLOCK_TIMEOUT", "0.4")
    provider = harness.provider()
    processor = harness.install(provider, receiver, **settings(max_queue_size=2, batch_size=2, **HELD))
    assert processor.exporter.config.overflow_policy == "block"
    receiver.hold()
    with TestClient(make_app(provider)) as client:
        fill_queue(receiver, client, 2)
        started = time.monotonic()
        assert client.get("/api/acme/things/2").status_code == 200
        waited = time.monotonic() - started
    assert waited >= 0.4, f"the request did not wait for the block timeout ({waited:.3f}s)"
    assert waited < 3
    assert counters["dropped"] == 1

    receiver.release()
    assert processor.force_flush(5000) is True
    assert_each_once(receiver.records_for(), paths(2))


def test_block_policy_accepts_when_space_frees_in_time(receiver: FakeOpenObserve, harness: Harness,
                                                       counters: Counters, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("O2_AUDIT_OVERFLOW", "block")
    monkeypatch.setenv("O2_AUDIT_BLOCK_TIMEOUT", "10")
    provider = harness.provider()
    processor = harness.install(provider, receiver, **settings(max_queue_size=2, batch_size=2, **HELD))
    receiver.hold()
    statuses: List[int] = []
    with TestClient(make_app(provider)) as client:
        fill_queue(receiver, client, 2)
        blocked = threading.Thread(target=lambda: statuses.append(client.get("/api/acme/things/2").status_code))
        blocked.start()
        wait_until(lambda: processor._waiting_for_space == 1, timeout=5,
                   message="the third request to wait for space")
        assert blocked.is_alive()
        receiver.release()  # the held batch completes: its records leave memory
        blocked.join(10)
        assert not blocked.is_alive()
    assert statuses == [200]
    assert counters["dropped"] == 0
    assert processor.force_flush(5000) is True
    assert_each_once(receiver.records_for(), paths(3))


def test_spool_policy_writes_to_disk_when_memory_is_full(receiver: FakeOpenObserve, harness: Harness,
                                                         tmp_path: Path, counters: Counters) -> None:
    provider = harness.provider()
    processor = harness.install(provider, receiver, **settings(tmp_path, max_queue_size=2, batch_size=2, **HELD))
    assert processor.exporter.config.overflow_policy == "spool"
    receiver.hold()
    with TestClient(make_app(provider)) as client:
        fill_queue(receiver, client, 2)
        get_many(client, 18, start=2)
    assert counters["dropped"] == 0
    wait_until(lambda: counters["captured"] == 20, timeout=5, message="all 20 records captured")
    assert counters["spooled"] > 0, "with memory full, records went straight to disk"
    assert counters["lost"] == 0

    receiver.release()
    assert processor.force_flush(10000) is True
    assert_each_once(receiver.records_for(), paths(20))


def test_max_queue_size_bounds_memory_under_a_held_receiver(receiver: FakeOpenObserve, harness: Harness,
                                                            counters: Counters) -> None:
    provider = harness.provider()
    processor = harness.install(provider, receiver, **settings(max_queue_size=10, batch_size=5, **HELD))
    receiver.hold()
    with TestClient(make_app(provider)) as client:
        fill_queue(receiver, client, 5)
        get_many(client, 45, start=5)
    wait_until(lambda: counters["captured"] + counters["dropped"] == 50, timeout=5,
               message="every request captured or dropped")
    captured = counters["captured"]
    assert captured <= 10, f"{captured} records held in memory with O2_AUDIT_MAX_QUEUE_SIZE=10"
    assert counters["dropped"] == 50 - captured

    receiver.release()
    assert processor.force_flush(5000) is True
    records = receiver.records_for()
    assert len(records) == captured
    assert len({r["event_id"] for r in records}) == captured
    assert counters["published"] == captured


def test_no_warning_spam_for_an_outage_without_losses(receiver: FakeOpenObserve, harness: Harness, tmp_path: Path,
                                                      counters: Counters, caplog: pytest.LogCaptureFixture,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """An outage the spool absorbs loses nothing: nothing may be logged as LOST or DROPPED."""
    monkeypatch.setattr(processor_module, "_RETRY_LATER", 0.3)
    provider = harness.provider()
    processor = harness.install(provider, receiver, **settings(tmp_path, retry_max_elapsed=0.3))
    receiver.stop()
    with TestClient(make_app(provider)) as client:
        get_many(client, 5)
        wait_until(lambda: len(messages(caplog, "kept in the spool")) >= 2, timeout=10,
                   message="two kept-batch cycles")
    receiver.restart()
    assert processor.force_flush(5000) is True
    assert_each_once(receiver.records_for(), paths(5))
    bad = [r.getMessage() for r in caplog.records if r.name == "otel_o2audit" and r.levelno >= logging.ERROR]
    assert bad == [], bad
    assert counters["lost"] == 0
