"""The durable spool (``otel_o2audit.spool.SpoolStore``), directly and through the processor.

Directly: order of add/take/settle, keep() rewinding, survival across close() and adoption by a new store
(replay flag, ``oldest() == 0``), torn and corrupt lines (skipped, counted lost once, never blocking what
follows), ownership by ``flock`` (two stores of one process, a real second process, a SIGKILL and two
adopters racing), the disk budget (segments, other processes' files, ``rejected/`` and ``expired/``), a write
cut short by a full disk, the fsync policy, segment rotation and adoption order.

Through the processor (real TracerProvider, the loopback FakeOpenObserve): records too old for OpenObserve's
ingestion window go to ``expired/`` (counted once, even when their batch is retried), batches the server
partly rejects are kept under ``rejected/`` and never re-sent, counts that do not add up are retried once then
accounted as lost with the batch kept the same way.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List

import pytest
from chaoskit import rec, segments, server_span, side_records
from fastapi.testclient import TestClient
from inproc import Counters, Harness, make_app, wait_until
from o2receiver import FakeOpenObserve

from otel_o2audit import spool as spool_module
from otel_o2audit.spool import SpoolStore
from otel_o2audit.store import Batch

BIG = 1 << 30
HOUR_NS = 3600 * 1_000_000_000


def store(directory: Path, **kwargs: Any) -> SpoolStore:
    kwargs.setdefault("max_bytes", BIG)
    kwargs.setdefault("fsync_interval", 1.0)
    return SpoolStore(str(directory), **kwargs)


def ids(batch: Batch) -> List[str]:
    return [r["event_id"] for r in batch.records]


def drain(spool: SpoolStore, limit: int = 1000) -> List[str]:
    """Take and settle everything; the event ids in order."""
    out: List[str] = []
    while True:
        batch = spool.take(limit)
        if batch is None:
            return out
        out.extend(ids(batch))
        spool.settle(batch)


def lost_messages(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "otel_o2audit" and r.levelno >= logging.ERROR and "LOST" in r.getMessage()]


@pytest.fixture
def counters() -> Counters:
    return Counters()


# --------------------------------------------------------------------------------------------------
# order, keep, settle
# --------------------------------------------------------------------------------------------------


def test_add_take_settle_in_order(tmp_path: Path) -> None:
    spool = store(tmp_path)
    try:
        assert spool.durable is True
        assert spool.take(10) is None
        assert spool.oldest() is None
        assert spool.pending() == 0
        assert spool.add([rec(i) for i in range(5)]) == 5
        assert spool.pending() == 5
        assert spool.in_memory() == 0, "the spool holds records on disk, not in memory"
        assert spool.oldest() == rec(0)["_timestamp"]

        first = spool.take(2)
        assert first is not None
        assert ids(first) == ["ev-00000", "ev-00001"]
        assert first.replay is False
        second = spool.take(2)
        assert second is not None
        assert ids(second) == ["ev-00002", "ev-00003"]
        assert spool.oldest() == rec(4)["_timestamp"], "oldest() is the next record not yet taken"
        spool.settle(first)
        spool.settle(second)
        assert spool.pending() == 1

        spool.add([rec(5)])
        assert drain(spool) == ["ev-00004", "ev-00005"]
        assert spool.pending() == 0
        assert spool.oldest() is None
        assert spool.take(10) is None
    finally:
        assert spool.close() == 0
    assert segments(tmp_path) == [], "a fully acknowledged segment is deleted at close"


def test_keep_rewinds_so_the_batch_is_taken_again(tmp_path: Path) -> None:
    spool = store(tmp_path)
    try:
        spool.add([rec(i) for i in range(4)])
        batch = spool.take(3)
        assert batch is not None
        assert ids(batch) == ["ev-00000", "ev-00001", "ev-00002"]
        assert spool.keep(batch) is True
        assert spool.pending() == 4, "a kept batch is still pending"
        again = spool.take(3)
        assert again is not None
        assert ids(again) == ids(batch)
        spool.settle(again)
        assert drain(spool) == ["ev-00003"]
    finally:
        spool.close()


def test_records_survive_close_and_are_adopted_by_a_new_store(tmp_path: Path) -> None:
    first = store(tmp_path)
    first.add([rec(i) for i in range(6)])
    batch = first.take(2)
    assert batch is not None
    first.settle(batch)  # acknowledged: must not come back
    taken_not_settled = first.take(2)
    assert taken_not_settled is not None  # in flight when the process stops: must come back
    assert first.close() == 4
    assert len(segments(tmp_path)) == 1

    second = store(tmp_path)
    try:
        assert second.pending() == 4
        assert second.oldest() == 0, "a replay backlog is due at once"
        batch = second.take(100)
        assert batch is not None
        assert batch.replay is True
        assert ids(batch) == ["ev-00002", "ev-00003", "ev-00004", "ev-00005"]
        second.settle(batch)
        assert second.take(100) is None
        assert len(segments(tmp_path)) == 1, "the adopted segment is deleted once settled"
        second.add([rec(9)])
        fresh = second.take(10)
        assert fresh is not None
        assert ids(fresh) == ["ev-00009"]
        assert fresh.replay is False
        second.settle(fresh)
    finally:
        second.close()
    assert segments(tmp_path) == []
    assert list(tmp_path.glob("*.ack")) == []


def test_adopted_files_are_replayed_before_the_live_segment_oldest_first(tmp_path: Path) -> None:
    for run in range(3):
        spool = store(tmp_path)
        spool.add([rec(run * 10 + i) for i in range(2)])
        spool.close()
    spool = store(tmp_path)
    try:
        spool.add([rec(99)])
        assert drain(spool, limit=1) == ["ev-00000", "ev-00001", "ev-00010", "ev-00011", "ev-00020", "ev-00021",
                                         "ev-00099"]
    finally:
        spool.close()


def test_adoption_order_is_by_creation_time_even_when_the_hostname_has_dashes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Segment names are ``seg-<host>-<pid>-<ns>-<n>``; Kubernetes pod names (``api-7f9c-x2k4p``) contain dashes.
    Replay must still go oldest first, not in the alphabetical order of the host names."""
    monkeypatch.setattr(socket, "gethostname", lambda: "zz-old-pod")
    old = store(tmp_path)
    old.add([rec(1)])
    old.close()
    monkeypatch.setattr(socket, "gethostname", lambda: "aa-new-pod")
    new = store(tmp_path)
    new.add([rec(2)])
    new.close()
    names = [p.name for p in segments(tmp_path)]
    monkeypatch.setattr(socket, "gethostname", lambda: "adopter")
    spool = store(tmp_path)
    try:
        got = drain(spool, limit=1)
        assert got == ["ev-00001", "ev-00002"], (
            f"replay order follows the host names, not the creation times: {got} from {names}")
    finally:
        spool.close()


def test_segment_rotation_keeps_order_and_does_not_count_own_records_as_replayed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "_SEGMENT_BYTES", 400)
    spool = store(tmp_path)
    try:
        for i in range(12):
            spool.add([rec(i)])
        assert len(segments(tmp_path)) >= 3, "the live segment rotates past _SEGMENT_BYTES"
        got: List[str] = []
        replay_flags = []
        while (batch := spool.take(5)) is not None:
            got.extend(ids(batch))
            replay_flags.append(batch.replay)
            spool.settle(batch)
        assert got == [f"ev-{i:05d}" for i in range(12)]
        assert len(segments(tmp_path)) == 1, "rotated segments are deleted once settled"
        assert not any(replay_flags), (
            "records this process wrote to a segment it rotated are flagged replay=True (the processor then "
            "counts them as 'replayed' and publishes them at once, ignoring the batch size and interval)")
    finally:
        spool.close()


# --------------------------------------------------------------------------------------------------
# torn and corrupt lines
# --------------------------------------------------------------------------------------------------


def test_torn_last_line_is_skipped_counted_once_and_does_not_block(tmp_path: Path, counters: Counters,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    first = store(tmp_path)
    first.add([rec(i) for i in range(3)])
    first.close()
    (segment,) = segments(tmp_path)
    with open(segment, "ab") as handle:
        handle.write(b'1234abcd {"event_id":"torn","_timest')  # a write cut by a crash: no newline

    second = store(tmp_path)
    try:
        batch = second.take(2)
        assert batch is not None
        assert ids(batch) == ["ev-00000", "ev-00001"]
        second.keep(batch)  # taken again later: the torn line must still be counted once only
        assert drain(second, limit=2) == ["ev-00000", "ev-00001", "ev-00002"]
        assert counters["lost"] == 1
        assert len(lost_messages(caplog)) == 1
        second.add([rec(7)])
        assert drain(second) == ["ev-00007"], "records after a torn file flow normally"
        assert counters["lost"] == 1
        assert not segment.exists(), "the torn file is deleted once everything before the tear is settled"
    finally:
        second.close()


def test_segment_truncated_mid_line_loses_only_that_record(tmp_path: Path, counters: Counters) -> None:
    torn = store(tmp_path)
    torn.add([rec(i) for i in range(4)])
    later = store(tmp_path)  # a second process's file, written after the torn one
    later.add([rec(10)])
    torn.close()
    later.close()
    (torn_segment,) = [p for p in segments(tmp_path) if b"ev-00000" in p.read_bytes()]
    os.truncate(torn_segment, torn_segment.stat().st_size - 7)

    spool = store(tmp_path)
    try:
        assert drain(spool) == ["ev-00000", "ev-00001", "ev-00002", "ev-00010"], "the tear must not block later files"
        assert counters["lost"] == 1
    finally:
        spool.close()
    assert segments(tmp_path) == []


def test_torn_line_is_counted_lost_once_across_restarts(tmp_path: Path, counters: Counters) -> None:
    """A process adopts a torn file, reads past the tear, cannot deliver (the batch is kept) and stops; the
    next process adopts the same file again. The one torn record must be counted lost once, not once per
    process that read it (or ``delivered + lost`` exceeds what was produced)."""
    first = store(tmp_path)
    first.add([rec(i) for i in range(2)])
    first.close()
    (segment,) = segments(tmp_path)
    with open(segment, "ab") as handle:
        handle.write(b'1234abcd {"event_id":"torn"')

    second = store(tmp_path)
    batch = second.take(10)
    assert batch is not None
    assert ids(batch) == ["ev-00000", "ev-00001"]
    second.keep(batch)  # the receiver is down: nothing settled
    second.close()

    third = store(tmp_path)
    try:
        assert drain(third) == ["ev-00000", "ev-00001"]
    finally:
        third.close()
    assert counters["lost"] == 1, f"one torn record counted lost {counters['lost']} times"


def test_corrupt_middle_line_is_skipped_and_counted(tmp_path: Path, counters: Counters) -> None:
    first = store(tmp_path)
    first.add([rec(i) for i in range(3)])
    first.close()
    (segment,) = segments(tmp_path)
    lines = segment.read_bytes().split(b"\n")
    assert lines[1].count(b"ev-00001") == 1
    lines[1] = lines[1].replace(b"ev-00001", b"ev-0000X")  # same length, checksum no longer matches
    segment.write_bytes(b"\n".join(lines))

    spool = store(tmp_path)
    try:
        batch = spool.take(10)
        assert batch is not None
        assert ids(batch) == ["ev-00000", "ev-00002"]
        spool.keep(batch)
        assert drain(spool) == ["ev-00000", "ev-00002"]
        assert counters["lost"] == 1
    finally:
        spool.close()


def test_a_file_holding_only_a_torn_line_is_removed(tmp_path: Path, counters: Counters) -> None:
    (tmp_path / "seg-deadhost-1-1-1.log").write_bytes(b"deadbeef {\"event_id\":")
    spool = store(tmp_path)
    try:
        assert drain(spool) == []
        assert counters["lost"] == 1
        assert not [p for p in segments(tmp_path) if "deadhost" in p.name]
    finally:
        spool.close()


# --------------------------------------------------------------------------------------------------
# ownership
# --------------------------------------------------------------------------------------------------


def test_two_stores_of_one_process_exclude_each_other(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """flock is per open file description: two stores in one process behave like two processes."""
    a = store(tmp_path)
    b = None
    try:
        a.add([rec(i) for i in range(3)])
        b = store(tmp_path)
        assert b.pending() == 0
        assert b.take(10) is None, "B adopted A's live segment while A holds it"
        monkeypatch.setattr(spool_module, "_ADOPT_EVERY", 0.0)
        b.tick()
        assert b.take(10) is None, "B adopted A's live segment on a rescan while A holds it"
        a.add([rec(3)])
        assert a.close() == 4

        b.tick()  # the next scan: A's file is free now
        assert b.pending() == 4
        assert drain(b) == [f"ev-{i:05d}" for i in range(4)]
    finally:
        a.close()
        if b is not None:
            b.close()
    assert segments(tmp_path) == []


_HOLDER = r"""
import sys
from otel_o2audit.spool import SpoolStore
spool = SpoolStore(sys.argv[1], max_bytes=1 << 30, fsync_interval=0)
count = int(sys.argv[2])
spool.add([{"_timestamp": 1750000000000000 + i, "event_id": f"held-{i}"} for i in range(count)])
print("ready", flush=True)
sys.stdin.readline()
"""

_ADOPTER = r"""
import json, sys
from otel_o2audit.spool import SpoolStore
print("ready", flush=True)
sys.stdin.readline()
spool = SpoolStore(sys.argv[1], max_bytes=1 << 30, fsync_interval=0)
got = []
while True:
    batch = spool.take(7)
    if batch is None:
        break
    got.extend(r["event_id"] for r in batch.records)
    spool.settle(batch)
spool.close()
print(json.dumps(got), flush=True)
"""


class Children:
    """Python subprocesses of one test, killed at teardown."""

    def __init__(self) -> None:
        self.procs: List[subprocess.Popen[str]] = []

    def start(self, script: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.communicate(timeout=10)


@pytest.fixture
def children() -> Iterator[Children]:
    pool = Children()
    try:
        yield pool
    finally:
        pool.cleanup()


def _ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    line = proc.stdout.readline()  # bounded: the child prints at once or exits (EOF)
    if line.strip() != "ready":
        proc.kill()
        _, err = proc.communicate(timeout=10)
        raise AssertionError(f"child did not start: {line!r}\n{err}")


@pytest.mark.parametrize("round_", range(3))
def test_a_live_process_keeps_its_segment_and_after_sigkill_it_is_adopted_exactly_once(
        tmp_path: Path, children: Children, monkeypatch: pytest.MonkeyPatch, round_: int) -> None:
    count = 50
    holder = children.start(_HOLDER, str(tmp_path), str(count))
    _ready(holder)
    (held,) = segments(tmp_path)

    mine = store(tmp_path)
    try:
        assert mine.pending() == 0, "a live process's segment was adopted"
        assert held.exists()

        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)

        # Two adopters race for the dead process's file: exactly one gets each record.
        adopters = [children.start(_ADOPTER, str(tmp_path)) for _ in range(2)]
        for proc in adopters:
            _ready(proc)
        for proc in adopters:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        monkeypatch.setattr(spool_module, "_ADOPT_EVERY", 0.0)
        mine.tick()  # and this process scans at the same moment
        got: List[str] = drain(mine)
        for proc in adopters:
            out, err = proc.communicate(timeout=30)
            assert proc.returncode == 0, err
            got.extend(json.loads(out.strip().splitlines()[-1]))
    finally:
        mine.close()
    assert sorted(got) == sorted(f"held-{i}" for i in range(count)), f"duplicates or losses: {len(got)} records"
    assert segments(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# disk budget and fsync
# --------------------------------------------------------------------------------------------------


def _line_size(tmp_path: Path) -> int:
    probe = store(tmp_path / "probe")
    probe.add([rec(0)])
    size = sum(p.stat().st_size for p in segments(tmp_path / "probe"))
    probe.close()
    return size


def test_records_beyond_the_disk_budget_are_counted_lost_and_logged(tmp_path: Path, counters: Counters,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    line = _line_size(tmp_path)
    spool = store(tmp_path / "spool", max_bytes=line * 3 + line // 2)
    try:
        assert spool.add([rec(i) for i in range(5)]) == 3
        assert counters["lost"] == 2
        (message,) = lost_messages(caplog)
        assert "2 audit records LOST" in message
        assert "O2_AUDIT_SPOOL_MAX_BYTES" in message
        assert spool.add([rec(5)]) == 0
        assert counters["lost"] == 3

        batch = spool.take(2)
        assert batch is not None
        spool.settle(batch)  # acknowledged records give their room back
        assert spool.add([rec(6), rec(7), rec(8)]) == 2
        assert counters["lost"] == 4
        assert drain(spool) == ["ev-00002", "ev-00006", "ev-00007"]
    finally:
        spool.close()


def test_disk_budget_includes_other_processes_files(tmp_path: Path, counters: Counters) -> None:
    line = _line_size(tmp_path)
    other = store(tmp_path / "spool")
    other.add([rec(i) for i in range(3)])
    spool = store(tmp_path / "spool", max_bytes=line * 4 + line // 2)
    try:
        assert spool.add([rec(10), rec(11)]) == 1
        assert counters["lost"] == 1
    finally:
        spool.close()
        other.close()


def test_rejected_and_expired_copies_stay_within_the_disk_budget(tmp_path: Path) -> None:
    """``rejected/`` and ``expired/`` live inside the spool directory. A server that keeps rejecting part of every
    batch (a field whose type conflicts with the stream's schema) adds a whole batch to ``rejected/`` each time;
    ``O2_AUDIT_SPOOL_MAX_BYTES`` must bound the directory all the same, not only the segments."""
    line = _line_size(tmp_path)
    budget = line * 20
    directory = tmp_path / "spool"
    spool = store(directory, max_bytes=budget)
    try:
        for _ in range(10):
            spool.write_rejected([rec(j) for j in range(10)])
            spool.write_expired([rec(j) for j in range(10)])
    finally:
        spool.close()
    total = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
    assert total <= budget, (f"the spool directory holds {total} bytes with O2_AUDIT_SPOOL_MAX_BYTES={budget}: "
                             "rejected/ and expired/ grow without bound")


def test_a_failed_write_leaves_no_partial_line_behind(tmp_path: Path, counters: Counters,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The disk fills up in the middle of a write (a short write, then ENOSPC). The records of that write are
    counted lost; the records written before and after it must be unaffected: no lost record delivered, no
    accepted record lost."""
    spool = store(tmp_path)
    try:
        assert spool.add([rec(0), rec(1)]) == 2
        line = len(spool_module._encode_line(rec(2)))
        real_write = os.write
        calls = {"n": 0}
        target = spool._live.fd  # type: ignore[union-attr]

        def disk_full(fd: int, data: Any) -> int:
            if fd != target:
                return real_write(fd, data)
            calls["n"] += 1
            if calls["n"] == 1:
                return real_write(fd, bytes(data[: line + 10]))  # rec(2) whole, rec(3) cut
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(os, "write", disk_full)
        assert spool.add([rec(2), rec(3)]) == 0
        monkeypatch.setattr(os, "write", real_write)
        assert counters["lost"] == 2

        assert spool.add([rec(4)]) == 1, "space is back: the next record is accepted"
        got = drain(spool)
    finally:
        monkeypatch.setattr(os, "write", real_write)
        spool.close()
    assert got == ["ev-00000", "ev-00001", "ev-00004"], (
        f"after a failed write the spool delivered {got}: records counted lost were sent, or an accepted one "
        "was lost (the partial write was left in the file and the segment's size no longer matches)")
    assert counters["lost"] == 2


@pytest.fixture
def fsyncs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> List[int]:
    """fsync calls on files under this test's tmp_path (other threads' fsyncs are ignored)."""
    calls: List[int] = []
    real = os.fsync

    def counting(fd: int) -> None:
        try:
            mine = os.readlink(f"/proc/self/fd/{fd}").startswith(str(tmp_path))
        except OSError:
            mine = False
        if mine:
            calls.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fsync", counting)
    return calls


def test_fsync_interval_zero_syncs_every_write(tmp_path: Path, fsyncs: List[int]) -> None:
    spool = store(tmp_path, fsync_interval=0)
    try:
        for i in range(3):
            spool.add([rec(i)])
            assert len(fsyncs) == i + 1, "fsync_interval=0 must fsync after every write"
        spool.tick()
        assert len(fsyncs) == 3
    finally:
        spool.close()
    again = store(tmp_path)
    try:
        assert drain(again) == ["ev-00000", "ev-00001", "ev-00002"]
    finally:
        again.close()


def test_fsync_interval_batches_syncs_on_tick_and_close(tmp_path: Path, fsyncs: List[int]) -> None:
    spool = store(tmp_path, fsync_interval=0.05)
    try:
        spool.add([rec(0)])
        spool.add([rec(1)])
        assert fsyncs == [], "with an interval, writes are not synced one by one"

        def ticked() -> bool:
            spool.tick()
            return len(fsyncs) == 1

        wait_until(ticked, timeout=5, message="tick() to fsync once the interval passed")
        spool.tick()
        assert len(fsyncs) == 1, "nothing new to sync"
        spool.add([rec(2)])
    finally:
        spool.close()
    assert len(fsyncs) == 2, "close() syncs what was written since the last sync"


# --------------------------------------------------------------------------------------------------
# through the processor: expired, rejected, mismatched counts
# --------------------------------------------------------------------------------------------------


def spool_settings(spool: Path, **overrides: Any) -> Dict[str, Any]:
    settings: Dict[str, Any] = {"spool_dir": str(spool), "publish_interval": 60, "batch_size": 5,
                                "retry_initial_backoff": 0.05, "retry_max_elapsed": 1, "timeout": 0.5,
                                "shutdown_timeout": 2}
    settings.update(overrides)
    return settings


def messages(caplog: pytest.LogCaptureFixture, text: str) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.name == "otel_o2audit" and text in r.getMessage()]


def test_expired_records_go_to_expired_folder_and_are_counted(receiver: FakeOpenObserve, harness: Harness,
                                                              tmp_path: Path, counters: Counters,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    provider = harness.provider()
    processor = harness.install(provider, receiver, **spool_settings(tmp_path, batch_size=10))
    tracer = provider.get_tracer("test")
    now = time.time_ns()
    server_span(tracer, "/api/acme/things/old1", end_ns=now - 6 * HOUR_NS)
    server_span(tracer, "/api/acme/things/fresh1")
    server_span(tracer, "/api/acme/things/old2", end_ns=now - 5 * HOUR_NS - 60 * 1_000_000_000)
    server_span(tracer, "/api/acme/things/fresh2")
    assert processor.force_flush(5000) is True

    assert sorted(r["http_path"] for r in receiver.records_for()) == ["/api/acme/things/fresh1",
                                                                      "/api/acme/things/fresh2"]
    sent = [r["http_path"] for q in receiver.ingestion_requests() for r in q.records or []]
    assert sorted(sent) == ["/api/acme/things/fresh1", "/api/acme/things/fresh2"], (
        "expired records are not sent to be rejected one by one")
    expired = side_records(tmp_path, "expired")
    assert sorted(r["http_path"] for r in expired) == ["/api/acme/things/old1", "/api/acme/things/old2"]
    assert all(isinstance(r["_timestamp"], int) and r["event_id"] for r in expired), "plain, loadable JSON lines"
    assert counters["expired"] == 2
    assert counters["published"] == 2
    assert counters["lost"] == 0
    assert messages(caplog, "EXPIRED"), "each expiry is logged"


def test_expired_records_are_counted_once_when_their_batch_is_retried(receiver: FakeOpenObserve,
                                                                      harness: Harness, tmp_path: Path,
                                                                      counters: Counters,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """The receiver is down: the batch (2 fresh records + 1 expired) is kept in the spool and retried later.
    The expired record must be moved to expired/ and counted once, not once per attempt."""
    provider = harness.provider()
    processor = harness.install(provider, receiver, **spool_settings(tmp_path, batch_size=3,
                                                                      retry_max_elapsed=0.3))
    tracer = provider.get_tracer("test")
    receiver.stop()
    # Fresh ones first: the batch is due only once all three wait (batch size), so it holds all three.
    server_span(tracer, "/api/acme/things/a")
    server_span(tracer, "/api/acme/things/b")
    server_span(tracer, "/api/acme/things/old", end_ns=time.time_ns() - 6 * HOUR_NS)
    wait_until(lambda: messages(caplog, "kept in the spool"), timeout=10,
               message="the batch to be kept in the spool while the receiver is down")

    receiver.restart()
    assert processor.force_flush(5000) is True
    assert sorted(r["http_path"] for r in receiver.records_for()) == ["/api/acme/things/a", "/api/acme/things/b"]
    expired = side_records(tmp_path, "expired")
    assert [r["http_path"] for r in expired] == ["/api/acme/things/old"], (
        f"the expired record was written {len(expired)} times to expired/")
    assert counters["expired"] == 1, f"1 expired record counted {counters['expired']} times"


def test_expired_records_found_at_replay(receiver: FakeOpenObserve, harness: Harness, tmp_path: Path,
                                         counters: Counters) -> None:
    """After a long outage the next start finds records older than the ingestion window in the spool."""
    now_us = time.time_ns() // 1000
    old = store(tmp_path)
    old.add([rec(0, ts_us=now_us - 6 * 3600 * 1_000_000), rec(1, ts_us=now_us), rec(2, ts_us=now_us)])
    old.close()

    provider = harness.provider()
    processor = harness.install(provider, receiver, **spool_settings(tmp_path))
    records = receiver.wait_for_records(2, timeout=10)
    assert sorted(r["event_id"] for r in records) == ["ev-00001", "ev-00002"]
    assert processor.force_flush(5000) is True
    assert [r["event_id"] for r in side_records(tmp_path, "expired")] == ["ev-00000"]
    assert counters["expired"] == 1
    assert counters["replayed"] == 2
    assert counters["lost"] == 0


def test_partly_rejected_batch_is_kept_under_rejected_and_never_resent(receiver: FakeOpenObserve,
                                                                       harness: Harness, tmp_path: Path,
                                                                       counters: Counters,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    provider = harness.provider()
    processor = harness.install(provider, receiver, **spool_settings(tmp_path))
    receiver.reject_records(2, error="Too old data, only last 5 hours data can be ingested. Data discarded.")
    with TestClient(make_app(provider)) as client:
        for i in range(5):
            assert client.get(f"/api/acme/things/{i}").status_code == 200
    (request,) = receiver.wait_for_requests(1, timeout=10)
    assert len(request.records or []) == 5
    wait_until(lambda: counters["rejected"] == 2, timeout=5, message="the rejected records to be counted")
    assert processor.force_flush(5000) is True, "nothing is left to send: the rejected batch is settled"

    assert len(receiver.ingestion_requests()) == 1, "a partly rejected batch must never be re-sent"
    stored = [r["http_path"] for r in receiver.records_for()]
    assert stored == [f"/api/acme/things/{i}" for i in range(3)]
    kept = side_records(tmp_path, "rejected")
    assert [r["event_id"] for r in kept] == [r["event_id"] for r in request.records or []], (
        "the whole batch is kept for inspection")
    assert counters["rejected"] == 2
    assert counters["published"] == 3
    assert counters["lost"] == 0
    warnings = messages(caplog, "rejected by")
    assert warnings
    assert "Too old data" in warnings[0], "the server's reason is logged"

    processor.shutdown()
    assert segments(tmp_path) == [], "nothing of the rejected batch is left for a replay"


@pytest.mark.parametrize("mismatches", [1, 2], ids=["recovers-on-retry", "mismatch-twice"])
def test_mismatched_counts_are_retried_once_then_lost_and_kept(receiver: FakeOpenObserve, harness: Harness,
                                                               tmp_path: Path, counters: Counters,
                                                               mismatches: int) -> None:
    provider = harness.provider()
    processor = harness.install(provider, receiver, **spool_settings(tmp_path))
    receiver.mismatch_counts(2, times=mismatches)
    with TestClient(make_app(provider)) as client:
        for i in range(5):
            assert client.get(f"/api/acme/things/{i}").status_code == 200
    receiver.wait_for_requests(2, timeout=10)
    wait_until(lambda: counters["published"] >= 3, timeout=5, message="the batch to be settled")
    assert processor.force_flush(5000) is True

    requests = receiver.ingestion_requests()
    assert len(requests) == 2, f"one retry, no more: {[r.summary() for r in requests]}"
    event_ids = [r["event_id"] for r in requests[0].records or []]
    assert [r["event_id"] for r in requests[1].records or []] == event_ids, "the retry re-sends the same batch"
    stored = {r["event_id"] for r in receiver.records_for()}
    if mismatches == 1:
        assert stored == set(event_ids)
        assert counters["lost"] == 0
        assert counters["published"] == 5
        assert side_records(tmp_path, "rejected") == []
    else:
        assert stored == set(event_ids[:3])
        assert counters["lost"] == 2
        assert counters["published"] == 3
        assert [r["event_id"] for r in side_records(tmp_path, "rejected")] == event_ids, (
            "the batch whose counts did not add up is kept for inspection")
    processor.shutdown()
    assert segments(tmp_path) == [], "a settled batch is never replayed"
