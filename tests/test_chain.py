"""The tamper-evidence chain (``otel_o2audit.chain``): sealing, checkpoints, canonical form, and the
OpenObserve storage round trip (through the loopback fake's real ``_json`` and ``_search`` endpoints)."""

from __future__ import annotations

import datetime
import gzip
import itertools
import json
import math
import os
import re
import threading
import time
from typing import Any, Callable, Dict, Iterator, List

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from o2receiver import FakeOpenObserve, normalize_record

from otel_o2audit.chain import (
    CHECKPOINT,
    MAC_PREFIX,
    CanonicalError,
    Chain,
    canonical_bytes,
    canonical_value,
    compute_mac,
    covered_fields,
    format_lost,
    parse_lost,
    verify_mac,
)
from otel_o2audit.verify import verify_records

KEY = b"0123456789abcdef-test-key"
OTHER_KEY = b"fedcba9876543210-other-key"
T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in µs
CORE_KEYS = (
    "user_email",
    "org_id",
    "protocol",
    "http_method",
    "http_path",
    "http_query_params",
    "http_body",
    "http_response_code",
    "trace_id",
)


def ticking(start: int = T0, step: int = 1_000_000) -> Callable[[], int]:
    counter = itertools.count(start, step)
    return lambda: next(counter)


def request_record(i: int, ts: int = T0) -> Dict[str, Any]:
    """A record shaped like RecordBuilder's output."""
    trace = f"{i:032x}"
    span = f"{i:016x}"
    return {
        "_timestamp": ts + i * 1000,
        "user_email": f"user{i}@example.com",
        "org_id": "acme",
        "protocol": "http",
        "http_method": "GET",
        "http_path": f"/api/acme/items/{i}",
        "http_query_params": "page=2&token=[REDACTED]",
        "http_body": "",
        "http_response_code": 200,
        "trace_id": trace,
        "event_id": trace + span,
        "span_id": span,
        "http_route": "/api/acme/items/{id}",
        "client_ip": "203.0.113.9",
        "user_agent": "curl/8.5.0 \u00e9\u4e2d\U0001f600",
        "duration_ms": round(1.2345 + i / 7, 3),
        "service_name": "billing-api",
        "read_only": True,
    }


# ----------------------------------------------------------------------------------------------- sealing


def test_seal_adds_the_chain_fields_and_links_each_record_to_the_previous() -> None:
    chain = Chain(KEY, chain_id="c1")
    records = [chain.seal(request_record(i)) for i in range(3)]
    assert [r["chain_seq"] for r in records] == [1, 2, 3]
    assert records[0]["chain_prev"] == ""
    assert records[1]["chain_prev"] == records[0]["chain_mac"]
    assert records[2]["chain_prev"] == records[1]["chain_mac"]
    for record in records:
        assert record["chain_id"] == "c1"
        assert record["record_type"] == "request"
        assert re.fullmatch(r"[0-9a-f]{64}", record["chain_mac"])
        assert record["chain_fields"] == ",".join(sorted(k for k in record if k != "chain_mac"))
        assert verify_mac(KEY, record)
        assert not verify_mac(OTHER_KEY, record)
        assert all(re.fullmatch(r"[a-z0-9_]+", k) for k in record)
    assert chain.last_seq == 3
    assert chain.chain_id == "c1"


def test_seal_mutates_and_returns_the_same_dict_and_keeps_a_given_record_type() -> None:
    chain = Chain(KEY)
    record = request_record(1)
    record["record_type"] = "admin"
    assert chain.seal(record) is record
    assert record["record_type"] == "admin"
    assert verify_mac(KEY, record)


def test_default_chain_ids_are_random_hex_per_chain() -> None:
    ids = {Chain(KEY).chain_id for _ in range(20)}
    assert len(ids) == 20
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)


def test_the_mac_is_hmac_sha256_over_the_prefixed_canonical_form() -> None:
    import hashlib
    import hmac

    record = Chain(KEY).seal(request_record(4))
    fields = covered_fields(record)
    assert fields is not None
    expected = hmac.new(KEY, MAC_PREFIX + canonical_bytes(record, fields), hashlib.sha256).hexdigest()
    assert record["chain_mac"] == expected == compute_mac(KEY, record, fields)
    text = canonical_bytes(record, fields).decode("ascii")
    assert json.loads(text)["chain_seq"] == 1
    assert list(json.loads(text)) == sorted(fields)


@pytest.mark.parametrize("field", sorted({*request_record(0), "record_type", "chain_id", "chain_seq", "chain_prev"}))
def test_changing_any_covered_field_breaks_the_mac(field: str) -> None:
    record = Chain(KEY).seal(request_record(5))
    tampered = dict(record)
    value = tampered[field]
    if isinstance(value, bool):
        tampered[field] = not value
    elif isinstance(value, (int, float)):
        tampered[field] = value + 1
    else:
        tampered[field] = value + "x"
    assert not verify_mac(KEY, tampered)
    removed = dict(record)
    removed[field] = None if value != "" else "x"
    assert not verify_mac(KEY, removed)


def test_dropping_or_tampering_with_chain_fields_or_chain_mac_breaks_the_mac() -> None:
    record = Chain(KEY).seal(request_record(6))
    fewer = dict(record, chain_fields=record["chain_fields"].replace(",user_email", ""))
    del fewer["user_email"]
    assert not verify_mac(KEY, fewer)
    assert not verify_mac(KEY, {k: v for k, v in record.items() if k != "chain_mac"})
    assert not verify_mac(KEY, dict(record, chain_mac=record["chain_mac"].upper()))
    assert not verify_mac(KEY, dict(record, chain_fields="a,b"))
    assert not verify_mac(KEY, dict(record, chain_fields=record["chain_fields"] + ",chain_mac"))


def test_columns_added_after_sealing_are_not_covered() -> None:
    record = Chain(KEY).seal(request_record(7))
    assert verify_mac(KEY, dict(record, _stream_name="audit", some_new_column=None, other=5))


def test_a_record_already_sealed_passes_through_seal_unchanged() -> None:
    chain = Chain(KEY)
    checkpoint = chain.checkpoint()
    before = dict(checkpoint)
    assert chain.seal(checkpoint) is checkpoint
    assert checkpoint == before
    foreign = Chain(OTHER_KEY, chain_id="old-process").seal(request_record(1))
    snapshot = dict(foreign)
    assert chain.seal(foreign) == snapshot
    assert chain.last_seq == 1  # only the checkpoint took a seq


def test_the_key_must_be_at_least_16_bytes_and_the_chain_id_well_formed() -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        Chain(b"short")
    with pytest.raises(ValueError, match="chain_id"):
        Chain(KEY, chain_id="bad id; drop")
    with pytest.raises(ValueError, match="checkpoint_interval"):
        Chain(KEY, checkpoint_interval=0)
    assert "0123456789abcdef" not in repr(Chain(KEY))


# ----------------------------------------------------------------------------------------------- canonical form


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (2, 2.0),
        (0, -0.0),
        (12.346, 12.346000000000002),
        (0.1 + 0.2, 0.3),
        (1.0000001, 1),
        (1_767_225_600_123_456, 1_767_225_600_123_456.0),
        (-3.5, -3.5000000001),
        (-0.0000001, 0),
    ],
)
def test_numbers_that_a_storage_round_trip_can_turn_into_each_other_share_one_canonical_text(
    a: float, b: float
) -> None:
    assert canonical_value(a) == canonical_value(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [(True, 1), (False, 0), ("2", 2), ("true", True), (1.5, 1.501), ("", "\u00a0"), (10**20, 10**20 + 1)],
)
def test_values_that_differ_have_different_canonical_texts(a: Any, b: Any) -> None:
    assert canonical_value(a) != canonical_value(b)


def test_canonical_texts_of_each_type() -> None:
    assert canonical_value(12.3456789) == "12.345679"
    assert canonical_value(1e-7) == "0"
    assert canonical_value(123456789012.5) == "123456789012.5"
    assert canonical_value(1e300) == str(int(1e300))
    assert canonical_value(True) == "true"
    assert canonical_value("a\"\\\n\u00e9") == '"a\\"\\\\\\n\\u00e9"'
    assert canonical_value(None) == canonical_value("") == '""'
    for bad in (math.nan, math.inf, [1], {"a": 1}, b"x"):
        with pytest.raises(CanonicalError):
            canonical_value(bad)


def test_a_covered_field_that_comes_back_missing_or_null_counts_as_the_empty_string() -> None:
    record = Chain(KEY).seal(request_record(8))
    assert record["http_body"] == ""
    without = {k: v for k, v in record.items() if k != "http_body"}
    assert verify_mac(KEY, without)
    assert verify_mac(KEY, dict(record, http_body=None))
    assert not verify_mac(KEY, {k: v for k, v in record.items() if k != "org_id"})


def test_seal_puts_the_record_in_the_form_openobserve_stores() -> None:
    clock = ticking(T0 + 5)
    chain = Chain(KEY, clock=clock)
    record: Dict[str, Any] = {
        "User.Email": "a@example.com",
        "@Weird-Key": 1,
        "gone": None,
        "nested": {"b": 1, "a": [1, 2]},
        "items": ["x", 2],
        "empty_list": [],
        "not_a_number": math.nan,
        "when": datetime.date(2026, 1, 2),
        "_timestamp": 1_767_225_600_123,  # milliseconds
    }
    chain.seal(record)
    assert record["user_email"] == "a@example.com"
    assert record["_weird_key"] == 1
    assert "gone" not in record
    assert "not_a_number" not in record
    assert record["nested"] == '{"a":[1,2],"b":1}'
    assert record["items"] == '["x",2]'
    assert record["empty_list"] == "[]"
    assert record["when"] == "2026-01-02"
    assert record["_timestamp"] == 1_767_225_600_123_000
    # What the server would store is exactly what was sealed.
    assert normalize_record(json.loads(json.dumps(record))) == record
    assert verify_mac(KEY, record)


@pytest.mark.parametrize(
    ("given_ts", "stored"),
    [
        (1_767_225_600, 1_767_225_600_000_000),  # seconds
        (1_767_225_600_123, 1_767_225_600_123_000),  # milliseconds
        (1_767_225_600_123_456, 1_767_225_600_123_456),  # microseconds
        (1_767_225_600_123_456_789, 1_767_225_600_123_456),  # nanoseconds
        (1_767_225_600_123_456.7, 1_767_225_600_123_456),  # float microseconds
    ],
)
def test_timestamps_are_stored_as_integer_microseconds_like_the_server_detects_them(
    given_ts: float, stored: int
) -> None:
    record = Chain(KEY).seal({"_timestamp": given_ts})
    assert record["_timestamp"] == stored


@pytest.mark.parametrize("given_ts", [None, 0, "2026-01-01T00:00:00Z", True, math.inf])
def test_a_missing_or_unusable_timestamp_becomes_the_chain_clock(given_ts: Any) -> None:
    record: Dict[str, Any] = {"event_id": "e"}
    if given_ts is not None:
        record["_timestamp"] = given_ts
    Chain(KEY, clock=lambda: T0 + 42).seal(record)
    assert record["_timestamp"] == T0 + 42


# ----------------------------------------------------------------------------------------------- checkpoints


def test_a_checkpoint_is_a_sealed_record_of_its_own_that_states_the_chain_state() -> None:
    chain = Chain(KEY, chain_id="c2", clock=lambda: T0 + 99, checkpoint_interval=600)
    first = chain.checkpoint()  # idle interval: no request yet
    chain.seal(request_record(1))
    chain.seal(request_record(2))
    second = chain.checkpoint(fields={"service_name": "billing-api", "chain_seq": 999, "record_type": "x"})
    closing = chain.checkpoint(closing=True)
    assert [first["chain_seq"], second["chain_seq"], closing["chain_seq"]] == [1, 4, 5]
    for checkpoint in (first, second, closing):
        assert checkpoint["record_type"] == CHECKPOINT
        assert checkpoint["_timestamp"] == T0 + 99
        assert checkpoint["checkpoint_interval_s"] == 600.0
        assert checkpoint["checkpoint_dropped"] == 0
        assert "checkpoint_lost" not in checkpoint
        assert checkpoint["event_id"] == f"chk-c2-{checkpoint['chain_seq']}"
        for key in CORE_KEYS:
            assert checkpoint[key] == (0 if key == "http_response_code" else "")
        assert verify_mac(KEY, checkpoint)
    assert (first["chain_last_seq"], first["checkpoint_prev_seq"], first["checkpoint_closing"]) == (0, 0, False)
    assert (second["chain_last_seq"], second["checkpoint_prev_seq"], second["checkpoint_closing"]) == (3, 1, False)
    assert (closing["chain_last_seq"], closing["checkpoint_prev_seq"], closing["checkpoint_closing"]) == (3, 4, True)
    assert second["service_name"] == "billing-api"
    assert second["chain_prev"] != ""
    assert chain.last_seq == 5


def test_after_a_closing_checkpoint_the_next_record_starts_a_new_chain() -> None:
    chain = Chain(KEY, chain_id="first")
    chain.seal(request_record(1))
    chain.checkpoint(closing=True)
    late = chain.seal(request_record(2))
    assert late["chain_id"] != "first"
    assert (late["chain_seq"], late["chain_prev"]) == (1, "")
    assert chain.chain_id == late["chain_id"]


def test_checkpoints_declare_losses_cumulatively_and_drops_as_a_total() -> None:
    chain = Chain(KEY, chain_id="c3")
    batch = [chain.seal(request_record(i)) for i in range(5)]
    replayed = Chain(KEY, chain_id="old").seal(request_record(9))
    chain.note_lost(batch[1:4])
    chain.note_lost([replayed, {"no": "chain"}], count=7)
    chain.note_lost(batch, count=0)
    chain.note_dropped(2)
    chain.note_dropped(0)
    first = chain.checkpoint()
    chain.note_lost(batch[4:], count=1)
    chain.note_dropped(1)
    second = chain.checkpoint()
    assert first["checkpoint_lost"] == "c3:2-4:3;old:1-1:1"
    assert parse_lost(second["checkpoint_lost"]) == [("c3", 2, 4, 3), ("c3", 5, 5, 1), ("old", 1, 1, 1)]
    assert (first["checkpoint_dropped"], second["checkpoint_dropped"]) == (2, 3)
    assert verify_mac(KEY, second)


def test_loss_declarations_stay_bounded_and_merging_keeps_them_sound() -> None:
    chain = Chain(KEY, chain_id="c4")
    records = [chain.seal(request_record(i)) for i in range(400)]
    lost = records[::4]  # 100 separate losses
    for record in lost:
        chain.note_lost([record])
    entries = parse_lost(chain.checkpoint()["checkpoint_lost"])
    assert len(entries) <= 64
    for record in lost:  # every loss still declared by an entry that allows enough missing records
        seq = record["chain_seq"]
        covering = [e for e in entries if e[1] <= seq <= e[2]]
        assert covering
        first, last, count = covering[0][1:]
        assert count == sum(1 for r in lost if first <= r["chain_seq"] <= last)


def test_parse_lost_ignores_malformed_entries() -> None:
    assert parse_lost("a:1-2:1;bad;b:3-1:1;c:0-1:1;d:5-5:x; e:7-9:2 ") == [("a", 1, 2, 1), ("e", 7, 9, 2)]
    assert parse_lost(None) == []
    assert parse_lost(5) == []
    assert format_lost([("b", 1, 1, 1), ("a", 2, 3, 1)]) == "a:2-3:1;b:1-1:1"


# ----------------------------------------------------------------------------------------------- concurrency


def test_concurrent_seals_take_unique_consecutive_seqs_and_form_one_valid_chain() -> None:
    chain = Chain(KEY, chain_id="threads")
    out: List[Dict[str, Any]] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def work(n: int) -> None:
        barrier.wait(timeout=10)
        for i in range(150):
            record = chain.seal(request_record(n * 1000 + i))
            with lock:
                out.append(record)
            if i % 50 == 49:
                checkpoint = chain.checkpoint()
                with lock:
                    out.append(checkpoint)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    out.append(chain.checkpoint(closing=True))
    assert sorted(r["chain_seq"] for r in out) == list(range(1, len(out) + 1))
    report = verify_records(out, KEY)
    assert report.exit_status == 0, report.render_text()
    assert report.chains[0].verified == [(1, len(out))]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_seals_into_a_new_chain_of_its_own() -> None:
    chain = Chain(KEY, chain_id="parent")
    chain.seal(request_record(1))
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            record = chain.seal(request_record(2))
            os.write(write_fd, json.dumps(record).encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        child = json.loads(pipe.read())
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert child["chain_id"] != "parent"
    assert (child["chain_seq"], child["chain_prev"]) == (1, "")
    assert verify_mac(KEY, child)
    parent_next = chain.seal(request_record(3))
    assert (parent_next["chain_id"], parent_next["chain_seq"]) == ("parent", 2)


# ----------------------------------------------------------------------------------------------- properties

_KEYS = st.from_regex(r"[a-z][a-z0-9_]{0,12}", fullmatch=True).filter(lambda k: not k.startswith("chain_"))
_VALUES = st.one_of(
    st.text(max_size=40),
    st.booleans(),
    st.integers(min_value=-(2**53), max_value=2**53),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12).map(lambda f: round(f, 3)),
)
_RECORDS = st.dictionaries(_KEYS, _VALUES, min_size=1, max_size=12)


def _storage_round_trip(record: Dict[str, Any], widen: Any) -> Dict[str, Any]:
    """JSON out and back, with some ints widened to floats (a column typed float64 by an earlier value)."""
    stored: Dict[str, Any] = json.loads(json.dumps(record))
    for key, value in list(stored.items()):
        if isinstance(value, int) and not isinstance(value, bool) and widen.draw(st.booleans()):
            stored[key] = float(value)
    return stored


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(_RECORDS, min_size=1, max_size=5), data=st.data())
def test_sealed_records_survive_the_storage_round_trip_and_any_change_is_detected(
    records: List[Dict[str, Any]], data: Any
) -> None:
    chain = Chain(KEY, chain_id="prop", clock=ticking())
    sealed = [chain.seal(dict(r)) for r in records]
    stored = [_storage_round_trip(r, data) for r in sealed]
    for record in stored:
        assert verify_mac(KEY, record)
    report = verify_records([*stored, chain.checkpoint(closing=True)], KEY)
    assert report.exit_status == 0, report.render_text()
    # Any change of any covered value to one with a different canonical text is detected.
    victim = dict(data.draw(st.sampled_from(stored)))
    fields = covered_fields(victim)
    assert fields is not None
    name = data.draw(st.sampled_from([f for f in fields if f != "chain_fields"]))
    new = data.draw(_VALUES.filter(lambda v: canonical_value(v) != canonical_value(victim.get(name))))
    victim[name] = new
    assert not verify_mac(KEY, victim)


# ----------------------------------------------------------------------------------------------- OpenObserve round trip


@pytest.fixture
def o2() -> Iterator[FakeOpenObserve]:
    fake = FakeOpenObserve().start()
    try:
        yield fake
    finally:
        fake.stop()
    assert fake.server_errors == []


def _post(fake: FakeOpenObserve, records: List[Dict[str, Any]]) -> None:
    body = gzip.compress(json.dumps(records, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    response = requests.post(
        fake.ingest_url(),
        data=body,
        auth=fake.auth,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    status = response.json()["status"][0]
    assert (status["successful"], status["failed"]) == (len(records), 0), status


def _search(fake: FakeOpenObserve, start: int, end: int) -> List[Dict[str, Any]]:
    hits: List[Dict[str, Any]] = []
    while True:
        query = {"sql": 'SELECT * FROM "audit"', "start_time": start, "end_time": end, "from": len(hits), "size": 10}
        response = requests.post(f"{fake.url}/api/_meta/_search", json={"query": query}, auth=fake.auth, timeout=10)
        assert response.status_code == 200, response.text
        page = response.json()["hits"]
        hits.extend(page)
        if len(page) < 10:
            return hits


def test_records_written_to_openobserve_and_read_back_with_search_still_verify(o2: FakeOpenObserve) -> None:
    now = time.time_ns() // 1000
    chain = Chain(KEY, clock=ticking(now, 1000), checkpoint_interval=600)
    sent: List[Dict[str, Any]] = []
    for batch in range(3):
        records = []
        for i in range(7):
            record = request_record(batch * 10 + i, ts=now - 60_000_000)
            record["duration_ms"] = float(i)  # 0.0, 1.0, ... come back as 0, 1 from a server that prints them so
            record["error_msg"] = None  # never sent: dropped before sealing
            records.append(chain.seal(record))
        records.append(chain.checkpoint(closing=batch == 2))
        _post(o2, records)
        sent.extend(records)
    hits = _search(o2, now - 3_600_000_000, now + 3_600_000_000)
    assert len(hits) == len(sent)
    widened = [{k: (float(v) if k == "http_response_code" else v) for k, v in h.items()} for h in hits]
    for hit in hits + widened:
        assert verify_mac(KEY, hit), hit
    report = verify_records(widened, KEY)
    assert report.exit_status == 0, report.render_text()
    assert report.chains[0].verified == [(1, len(sent))]
    assert report.chains[0].closed_at == len(sent)
