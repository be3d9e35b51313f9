"""Tests of the FakeOpenObserve test double (tests/o2receiver.py) against openobserve.md.

Every wait is a condition wait with a deadline (``wait_for_*``, ``Future.result(timeout=...)``);
nothing sleeps hoping for the server to catch up.
"""

from __future__ import annotations

import gzip
import json
import socket
import time
import tracemalloc
import zlib
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any, Dict, Iterator, List, Optional

import pytest
import requests
from o2receiver import (
    TOO_FAR_ERROR,
    TOO_OLD_ERROR,
    FakeOpenObserve,
    ReceivedRequest,
    format_stream_name,
    parse_timestamp_micros,
)

HOUR_US = 3600 * 1_000_000


@pytest.fixture
def o2() -> Iterator[FakeOpenObserve]:
    fake = FakeOpenObserve().start()
    try:
        yield fake
    finally:
        fake.stop()
    assert fake.server_errors == []


def now_us() -> int:
    return time.time_ns() // 1000


def post(
    fake: FakeOpenObserve,
    payload: Any = None,
    *,
    data: Optional[bytes] = None,
    org: str = "_meta",
    stream: str = "audit",
    auth: Any = "default",
    headers: Optional[Dict[str, str]] = None,
    timeout: float = 5.0,
    session: Optional[requests.Session] = None,
) -> requests.Response:
    """POST to the fake's _json endpoint; ``payload`` is JSON-encoded unless raw ``data`` is given."""
    body = data if data is not None else json.dumps(payload).encode()
    all_headers = {"Content-Type": "application/json", **(headers or {})}
    sender: Any = session if session is not None else requests
    response: requests.Response = sender.post(
        fake.ingest_url(org, stream),
        data=body,
        headers=all_headers,
        auth=fake.auth if auth == "default" else auth,
        timeout=timeout,
    )
    return response


def recs(n: int, **extra: Any) -> List[Dict[str, Any]]:
    return [{"seq": i, "_timestamp": now_us(), **extra} for i in range(n)]


# --------------------------------------------------------------------------------------------------
# auth
# --------------------------------------------------------------------------------------------------


def test_missing_authorization_is_401_json(o2: FakeOpenObserve) -> None:
    r = post(o2, recs(1), auth=None)
    assert r.status_code == 401
    assert r.headers["Content-Type"].startswith("application/json")
    assert r.json() == {"code": 401, "message": "Unauthorized Access"}
    assert "WWW-Authenticate" not in r.headers
    assert o2.records == []
    (req,) = o2.wait_for_requests(1)
    assert req.status == 401
    assert "authorization" not in req.headers


@pytest.mark.parametrize(
    "auth",
    [("root@example.com", "wrong"), ("other@example.com", "Complexpass#123")],
    ids=["bad-password", "bad-user"],
)
def test_bad_credentials_are_401_plain_text_with_www_authenticate(o2: FakeOpenObserve, auth: Any) -> None:
    r = post(o2, recs(1), auth=auth)
    assert r.status_code == 401
    assert r.headers["Content-Type"].startswith("text/plain")
    assert r.text == "Unauthorized Access"
    assert r.headers["WWW-Authenticate"].startswith('Basic realm="')
    assert o2.records == []


def test_bearer_token_is_rejected_as_bad_credentials(o2: FakeOpenObserve) -> None:
    r = post(o2, recs(1), auth=None, headers={"Authorization": "Bearer abc"})
    assert r.status_code == 401
    assert r.text == "Unauthorized Access"
    assert "WWW-Authenticate" in r.headers


def test_custom_credentials() -> None:
    with FakeOpenObserve(user="svc@example.com", password="s3cret") as fake:
        assert post(fake, recs(1)).status_code == 200
        assert post(fake, recs(1), auth=("root@example.com", "Complexpass#123")).status_code == 401


# --------------------------------------------------------------------------------------------------
# body decoding
# --------------------------------------------------------------------------------------------------


def _raw_deflate(data: bytes) -> bytes:
    c = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return c.compress(data) + c.flush()


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", _raw_deflate),
        ("identity", lambda b: b),
    ],
    ids=["gzip", "deflate-zlib", "deflate-raw", "identity"],
)
def test_compressed_bodies_are_decoded(o2: FakeOpenObserve, encoding: str, compress: Any) -> None:
    payload = recs(3, user_email="a@b.c")
    raw = compress(json.dumps(payload).encode())
    r = post(o2, data=raw, headers={"Content-Encoding": encoding})
    assert r.status_code == 200, r.text
    assert r.json()["status"][0]["successful"] == 3
    assert [rec["seq"] for rec in o2.wait_for_records(3)] == [0, 1, 2]
    (req,) = o2.wait_for_requests(1)
    assert req.body == raw  # raw bytes as sent
    assert req.headers["content-encoding"] == encoding
    assert req.records == payload  # decoded, as the client sent them


def test_multi_member_gzip(o2: FakeOpenObserve) -> None:
    text = json.dumps(recs(2)).encode()
    raw = gzip.compress(text[:10]) + gzip.compress(text[10:])
    assert post(o2, data=raw, headers={"Content-Encoding": "gzip"}).status_code == 200
    assert len(o2.wait_for_records(2)) == 2


@pytest.mark.parametrize("encoding", ["br", "zstd", "compress", "snappy"])
def test_unsupported_encoding_is_415(o2: FakeOpenObserve, encoding: str) -> None:
    r = post(o2, data=b"whatever", headers={"Content-Encoding": encoding})
    assert r.status_code == 415
    assert o2.records == []


def test_corrupt_gzip_is_400(o2: FakeOpenObserve) -> None:
    r = post(o2, data=b"\x1f\x8bnot really gzip", headers={"Content-Encoding": "gzip"})
    assert r.status_code == 400
    truncated = gzip.compress(json.dumps(recs(5)).encode())[:-12]
    assert post(o2, data=truncated, headers={"Content-Encoding": "gzip"}).status_code == 400
    assert o2.records == []


@pytest.mark.parametrize("body", [b'[{"a": 1}', b"not json", b"", b"[NaN]", b"42"])
def test_malformed_json_is_400_serde_error(o2: FakeOpenObserve, body: bytes) -> None:
    r = post(o2, data=body)
    assert r.status_code == 400
    answer = r.json()
    assert answer["code"] == 400
    assert answer["message"].startswith("SerdeJsonError# ")
    (req,) = o2.wait_for_requests(1)
    assert req.records is None
    assert req.decode_error is not None


def test_chunked_request_body(o2: FakeOpenObserve) -> None:
    text = json.dumps(recs(4)).encode()

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(text), 7):
            yield text[i : i + 7]

    r = requests.post(o2.ingest_url(), data=chunks(), auth=o2.auth, timeout=5)
    assert r.status_code == 200, r.text
    (req,) = o2.wait_for_requests(1)
    assert req.headers["transfer-encoding"] == "chunked"
    assert req.body == text
    assert len(o2.records) == 4


# --------------------------------------------------------------------------------------------------
# success answers
# --------------------------------------------------------------------------------------------------


def test_success_counts_exact_shape(o2: FakeOpenObserve) -> None:
    r = post(o2, recs(3))
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"code": 200, "status": [{"name": "audit", "successful": 3, "failed": 0}]}
    assert [rec["seq"] for rec in o2.wait_for_records(3)] == [0, 1, 2]


def test_single_object_is_accepted(o2: FakeOpenObserve) -> None:
    r = post(o2, {"seq": 1})
    assert r.json()["status"] == [{"name": "audit", "successful": 1, "failed": 0}]
    (req,) = o2.wait_for_requests(1)
    assert req.records == [{"seq": 1}]


def test_empty_array_is_200_with_zero_counts(o2: FakeOpenObserve) -> None:
    r = post(o2, [])
    assert r.status_code == 200
    assert r.json() == {"code": 200, "status": [{"name": "audit", "successful": 0, "failed": 0}]}
    assert o2.records == []


def test_stream_name_is_formatted_and_records_are_per_org_and_stream(o2: FakeOpenObserve) -> None:
    assert format_stream_name("My-Stream..V2") == "my_stream_v2"
    assert format_stream_name("a:B_c") == "a:b_c"
    r = post(o2, recs(2), org="acme", stream="My-Stream..V2")
    assert r.json()["status"][0]["name"] == "my_stream_v2"
    post(o2, recs(1))
    assert len(o2.wait_for_records(2, org="acme", stream="My-Stream..V2")) == 2
    assert len(o2.records_for("acme", "my_stream_v2")) == 2
    assert len(o2.records_for()) == 1
    assert o2.records_for("_meta", "my_stream_v2") == []
    assert len(o2.records) == 3


def test_non_object_array_items_fail_individually(o2: FakeOpenObserve) -> None:
    r = post(o2, [{"a": 1}, 5, "x"])
    status = r.json()["status"][0]
    assert (status["successful"], status["failed"]) == (1, 2)
    assert "error" in status


def test_path_prefix_and_query_string(o2: FakeOpenObserve) -> None:
    r = requests.post(f"{o2.url}/o2/base/api/_meta/audit/_json?x=1", json=recs(1), auth=o2.auth, timeout=5)
    assert r.status_code == 200
    (req,) = o2.wait_for_requests(1)
    assert (req.prefix, req.org, req.stream, req.query) == ("/o2/base", "_meta", "audit", "x=1")
    assert req.path == "/o2/base/api/_meta/audit/_json"
    assert post(o2, recs(1)).status_code == 200
    assert o2.wait_for_requests(2)[1].prefix == ""


def test_keep_alive_reuses_one_connection(o2: FakeOpenObserve) -> None:
    with requests.Session() as session:
        for _ in range(5):
            r = post(o2, recs(1), session=session)
            assert r.status_code == 200
            assert r.raw.version == 11
            assert "Content-Length" in r.headers
    assert o2.connections_accepted == 1
    assert len(o2.records) == 5


def test_other_endpoints(o2: FakeOpenObserve) -> None:
    config = requests.get(f"{o2.url}/config", timeout=5)
    assert config.status_code == 200
    assert {"version", "commit_hash", "build_type"} <= set(config.json())
    health = requests.get(f"{o2.url}/healthz", timeout=5)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})
    assert requests.get(f"{o2.url}/nope", timeout=5).status_code == 404
    assert requests.get(o2.ingest_url(), auth=o2.auth, timeout=5).status_code == 404
    assert requests.post(f"{o2.url}/api/_meta/audit/_multi", auth=o2.auth, timeout=5).status_code == 404
    routes = [r.route for r in o2.requests_log]
    assert routes == ["config", "healthz", "unknown", "unknown", "unknown"]
    assert o2.ingestion_requests() == []


def test_concurrent_clients(o2: FakeOpenObserve) -> None:
    def client(worker: int) -> List[int]:
        with requests.Session() as session:
            return [post(o2, [{"worker": worker, "i": i}], session=session).status_code for i in range(10)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(client, range(8)))
    assert all(code == 200 for codes in results for code in codes)
    stored = o2.wait_for_records(80)
    assert len(stored) == 80
    assert {(r["worker"], r["i"]) for r in stored} == {(w, i) for w in range(8) for i in range(10)}
    assert len(o2.wait_for_requests(80)) == 80


# --------------------------------------------------------------------------------------------------
# scripted behaviours
# --------------------------------------------------------------------------------------------------


def test_respond_status_storm_then_normal(o2: FakeOpenObserve) -> None:
    o2.respond_status(503, times=2)
    assert o2.pending_behaviours == 2
    first, second, third = (post(o2, recs(1)) for _ in range(3))
    assert first.status_code == second.status_code == 503
    assert first.json()["code"] == 503
    assert first.json()["message"].startswith("Error# ")
    assert third.status_code == 200
    reqs = o2.wait_for_requests(3)
    assert [r.status for r in reqs] == [503, 503, 200]
    assert reqs[0].records is not None  # decoded for the log even when answered 503
    assert len(o2.records) == 1
    assert o2.pending_behaviours == 0


def test_respond_status_retry_after_header(o2: FakeOpenObserve) -> None:
    o2.respond_status(429, retry_after="7")
    o2.respond_status(429)
    with_header = post(o2, recs(1))
    without_header = post(o2, recs(1))
    assert with_header.status_code == without_header.status_code == 429
    assert with_header.headers["Retry-After"] == "7"
    assert "Retry-After" not in without_header.headers
    assert o2.wait_for_requests(2)[0].response_headers["Retry-After"] == "7"


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 500, 502, 504])
def test_respond_status_any_code(o2: FakeOpenObserve, status: int) -> None:
    r = post(o2, recs(2))
    assert r.status_code == 200
    o2.respond_status(status)
    r = post(o2, recs(2))
    assert r.status_code == status
    assert len(r.content) == int(r.headers["Content-Length"])
    assert len(o2.records) == 2  # only the first request stored anything


def test_respond_status_custom_body_and_applies_before_auth(o2: FakeOpenObserve) -> None:
    o2.respond_status(502, body="<html>bad gateway</html>")
    o2.respond_status(503, body='{"code":503,"message":"Error# memtable full"}')
    r1 = post(o2, recs(1), auth=("nobody", "nothing"))
    r2 = post(o2, recs(1))
    assert (r1.status_code, r1.text) == (502, "<html>bad gateway</html>")
    assert r1.headers["Content-Type"].startswith("text/plain")
    assert r2.status_code == 503
    assert r2.json() == {"code": 503, "message": "Error# memtable full"}


def test_reject_records_fails_the_last_records(o2: FakeOpenObserve) -> None:
    o2.reject_records(2)
    r = post(o2, recs(5))
    assert r.status_code == 200
    assert r.json()["status"] == [{"name": "audit", "successful": 3, "failed": 2, "error": TOO_OLD_ERROR}]
    assert [rec["seq"] for rec in o2.wait_for_records(3)] == [0, 1, 2]
    # consumed: the next request is normal
    assert post(o2, recs(1)).json()["status"][0]["failed"] == 0


def test_reject_records_custom_error_times_and_more_than_sent(o2: FakeOpenObserve) -> None:
    o2.reject_records(5, error="Failed to cast", times=2)
    for _ in range(2):
        status = post(o2, recs(2)).json()["status"][0]
        assert status == {"name": "audit", "successful": 0, "failed": 2, "error": "Failed to cast"}
    assert o2.records == []
    assert o2.pending_behaviours == 0


def test_mismatch_counts_loses_records_silently(o2: FakeOpenObserve) -> None:
    o2.mismatch_counts(2)
    r = post(o2, recs(5))
    status = r.json()["status"][0]
    assert status == {"name": "audit", "successful": 3, "failed": 0}
    assert status["successful"] + status["failed"] != 5
    assert [rec["seq"] for rec in o2.wait_for_records(3)] == [0, 1, 2]
    assert len(o2.records) == 3


def test_behaviours_are_consumed_fifo_one_per_request(o2: FakeOpenObserve) -> None:
    o2.respond_status(502)
    o2.reject_records(1)
    o2.mismatch_counts(1)
    answers = [post(o2, recs(2)) for _ in range(4)]
    assert [a.status_code for a in answers] == [502, 200, 200, 200]
    counts = [(s["successful"], s["failed"]) for s in (a.json()["status"][0] for a in answers[1:])]
    assert counts == [(1, 1), (1, 0), (2, 0)]
    behaviours = [r.behaviour for r in o2.wait_for_requests(4)]
    assert behaviours == ["status 502", "reject last 1", "drop 1 silently", None]


def test_max_records_per_request_is_413(o2: FakeOpenObserve) -> None:
    o2.max_records_per_request = 2
    r = post(o2, recs(3))
    assert r.status_code == 413
    assert r.headers["Content-Type"].startswith("text/plain")
    assert o2.records == []
    assert post(o2, recs(2)).status_code == 200
    assert len(o2.records) == 2
    o2.max_records_per_request = None
    assert post(o2, recs(3)).status_code == 200


def test_payload_limit_applies_after_decompression() -> None:
    with FakeOpenObserve(payload_limit=1024) as fake:
        big = [{"pad": "x" * 2000}]
        r = post(fake, big)
        assert r.status_code == 413
        assert r.headers["Content-Type"].startswith("text/plain")
        # compressed it is tiny, decompressed it is still over the limit
        small_wire = gzip.compress(json.dumps(big).encode())
        assert len(small_wire) < 1024
        r = post(fake, data=small_wire, headers={"Content-Encoding": "gzip"})
        assert r.status_code == 413
        assert post(fake, recs(2)).status_code == 200
        assert len(fake.records) == 2
        assert [q.status for q in fake.wait_for_requests(3)] == [413, 413, 200]


def test_gzip_bomb_is_not_decompressed_unboundedly() -> None:
    limit = 1024 * 1024
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(1024 * 1024)
    bomb = b"".join(compressor.compress(zeros) for _ in range(256)) + compressor.flush()  # 256 MiB
    assert len(bomb) < limit
    with FakeOpenObserve(payload_limit=limit) as fake:
        tracemalloc.start()
        try:
            r = post(fake, data=bomb, headers={"Content-Encoding": "gzip"}, timeout=30)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert r.status_code == 413
        assert peak < 32 * 1024 * 1024, f"peak {peak} bytes: decompression is not bounded"
        assert fake.records == []


def test_hang_outlasts_client_timeout_and_stop_cuts_it_short() -> None:
    fake = FakeOpenObserve().start()
    try:
        fake.hang(5)
        with pytest.raises(requests.exceptions.ReadTimeout):
            post(fake, recs(1), timeout=0.2)
        (req,) = fake.wait_for_requests(1)
        assert (req.state, req.status) == ("hanging", None)
    finally:
        started = time.monotonic()
        fake.stop()
        elapsed = time.monotonic() - started
    assert elapsed < 2.0, f"stop() took {elapsed:.2f}s"
    assert req.state == "abandoned"
    assert req.status is None
    assert fake.records == []


def test_hang_ends_then_request_is_processed_normally(o2: FakeOpenObserve) -> None:
    o2.hang(0.3)
    started = time.monotonic()
    r = post(o2, recs(2), timeout=5)
    elapsed = time.monotonic() - started
    assert r.status_code == 200
    assert elapsed >= 0.3
    assert len(o2.records) == 2
    (req,) = o2.wait_for_requests(1)
    assert req.behaviour == "hang 0.3s"


def test_records_of_a_timed_out_request_are_still_stored_when_the_hang_ends(o2: FakeOpenObserve) -> None:
    o2.hang(0.5)
    with pytest.raises(requests.exceptions.ReadTimeout):
        post(o2, recs(1), timeout=0.1)
    assert len(o2.wait_for_records(1)) == 1  # the server finished the work the client gave up on
    (req,) = o2.wait_for_requests(1)
    o2.wait_until(lambda: req.state == "answered", description="the hung request to be answered")
    assert req.status == 200


def test_reset_cuts_a_hang_short_and_abandons_it(o2: FakeOpenObserve) -> None:
    o2.hang(5)
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(post, o2, recs(1), timeout=10)
        (req,) = o2.wait_for_requests(1)
        assert req.state == "hanging"
        started = time.monotonic()
        o2.reset()
        with pytest.raises(requests.exceptions.ConnectionError):
            future.result(timeout=5)
        assert time.monotonic() - started < 2.0
    assert req.state == "abandoned"
    assert o2.records == []
    assert o2.requests_log == []


def test_hold_parks_requests_until_released(o2: FakeOpenObserve) -> None:
    o2.hold()
    assert o2.held
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(post, o2, recs(1)) for _ in range(2)]
        reqs = o2.wait_for_requests(2)
        assert [r.state for r in reqs] == ["held", "held"]
        assert o2.records == []
        assert not any(f.done() for f in futures)
        o2.release()
        assert [f.result(timeout=5).status_code for f in futures] == [200, 200]
    assert len(o2.wait_for_records(2)) == 2
    assert [r.state for r in o2.wait_for_requests(2)] == ["answered", "answered"]


def test_reset_clears_everything(o2: FakeOpenObserve) -> None:
    post(o2, recs(2))
    o2.respond_status(503, times=3)
    o2.max_records_per_request = 1
    o2.hold()
    o2.reset()
    assert (o2.records, o2.requests_log, o2.pending_behaviours) == ([], [], 0)
    assert not o2.held
    assert o2.max_records_per_request is None
    assert post(o2, recs(2)).status_code == 200


# --------------------------------------------------------------------------------------------------
# record validation and normalization
# --------------------------------------------------------------------------------------------------


def test_too_old_records_fail_individually(o2: FakeOpenObserve) -> None:
    old = now_us() - 6 * HOUR_US
    payload = [{"seq": 0, "_timestamp": now_us()}, {"seq": 1, "_timestamp": old}]
    r = post(o2, payload)
    assert r.status_code == 200
    assert r.json()["status"] == [{"name": "audit", "successful": 1, "failed": 1, "error": TOO_OLD_ERROR}]
    assert [rec["seq"] for rec in o2.wait_for_records(1)] == [0]
    (req,) = o2.wait_for_requests(1)
    assert req.records == payload  # the raw records are still in the log


def test_too_far_in_future_records_fail_individually(o2: FakeOpenObserve) -> None:
    payload = [
        {"seq": 0, "_timestamp": now_us() + 25 * HOUR_US},
        {"seq": 1, "_timestamp": now_us() + 23 * HOUR_US},
    ]
    status = post(o2, payload).json()["status"][0]
    assert status == {"name": "audit", "successful": 1, "failed": 1, "error": TOO_FAR_ERROR}
    assert [rec["seq"] for rec in o2.records] == [1]


def test_error_is_the_last_per_record_error(o2: FakeOpenObserve) -> None:
    payload = [
        {"_timestamp": now_us() + 25 * HOUR_US},
        {"_timestamp": now_us() - 6 * HOUR_US},
    ]
    status = post(o2, payload).json()["status"][0]
    assert (status["successful"], status["failed"], status["error"]) == (0, 2, TOO_OLD_ERROR)


def test_window_is_configurable() -> None:
    with FakeOpenObserve(allowed_upto_hours=1) as fake:
        status = post(fake, [{"_timestamp": now_us() - 2 * HOUR_US}]).json()["status"][0]
        assert status["failed"] == 1


@pytest.mark.parametrize("unit", ["s", "ms", "us", "ns"])
def test_timestamp_units_are_detected_and_stored_as_micros(o2: FakeOpenObserve, unit: str) -> None:
    base_s = int(time.time()) - 60
    value = {"s": base_s, "ms": base_s * 1000, "us": base_s * 10**6, "ns": base_s * 10**9}[unit]
    assert post(o2, [{"_timestamp": value}]).json()["status"][0]["successful"] == 1
    (stored,) = o2.wait_for_records(1)
    assert stored["_timestamp"] == base_s * 10**6


def test_string_and_float_timestamps(o2: FakeOpenObserve) -> None:
    moment = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)
    micros = int(moment.timestamp()) * 10**6
    payload = [
        {"_timestamp": str(micros)},
        {"_timestamp": moment.strftime("%Y-%m-%d %H:%M:%S")},
        {"_timestamp": moment.strftime("%Y-%m-%dT%H:%M:%S")},
        {"_timestamp": moment.isoformat().replace("+00:00", "Z")},
        {"_timestamp": moment.astimezone(timezone(timedelta(hours=2))).isoformat()},
        {"_timestamp": float(micros // 10**6) + 0.5},
    ]
    status = post(o2, payload).json()["status"][0]
    assert (status["successful"], status["failed"]) == (6, 0), status
    assert [r["_timestamp"] for r in o2.records] == [micros] * 6


def test_missing_null_or_zero_timestamp_means_now(o2: FakeOpenObserve) -> None:
    before = now_us()
    post(o2, [{"seq": 0}, {"seq": 1, "_timestamp": None}, {"seq": 2, "_timestamp": 0}])
    after = now_us()
    stored = o2.wait_for_records(3)
    assert all(before <= r["_timestamp"] <= after for r in stored)


@pytest.mark.parametrize(
    ("value", "error"),
    [(True, "Invalid time format [type]"), ("yesterday-ish", "invalid time format [string]")],
)
def test_invalid_timestamps_fail_the_record(o2: FakeOpenObserve, value: Any, error: str) -> None:
    status = post(o2, [{"_timestamp": value}]).json()["status"][0]
    assert status == {"name": "audit", "successful": 0, "failed": 1, "error": error}


def test_parse_timestamp_micros_matches_openobserve_vectors() -> None:
    # the expectations of config/src/utils/time.rs's own unit tests
    assert parse_timestamp_micros(1609459200000000000) == 1609459200000000
    assert parse_timestamp_micros(1609459200000000) == 1609459200000000
    assert parse_timestamp_micros(1609459200000) == 1609459200000000
    assert parse_timestamp_micros(1609459200) == 1609459200000000
    assert parse_timestamp_micros("2021-01-01T00:00:00") == 1609459200000000
    assert parse_timestamp_micros("2021-01-01T00:00:00Z") == 1609459200000000
    assert parse_timestamp_micros("2021-01-01T00:00:00+08:00") == 1609430400000000
    assert parse_timestamp_micros("2021-01-01T00:00:00-08:00") == 1609488000000000
    assert parse_timestamp_micros("2021-01-01 00:00:00") == 1609459200000000
    assert parse_timestamp_micros("2021-01-01T00:00:00.000000Z") == 1609459200000000
    assert parse_timestamp_micros("Wed, 8 Mar 2023 16:46:51 CST") == 1678315611000000
    assert parse_timestamp_micros(0, now_us=42) == 42


def test_keys_are_normalized_and_nulls_dropped(o2: FakeOpenObserve) -> None:
    ts = now_us()
    raw = {
        "@timestamp": ts,
        "User.Email": "a@b.c",
        "HTTP-Method": "GET",
        "http_response_code": 200,
        "error_msg": None,
        "nested": {"Inner Key": {"deep": 1, "gone": None}},
        "tags": ["a", "b"],
        "empty_obj": {},
        "empty_list": [],
    }
    assert post(o2, [raw]).json()["status"][0]["successful"] == 1
    (stored,) = o2.wait_for_records(1)
    assert stored == {
        "_timestamp": ts,
        "user_email": "a@b.c",
        "http_method": "GET",
        "http_response_code": 200,
        "nested_inner_key_deep": 1,
        "tags": '["a","b"]',
    }
    (req,) = o2.wait_for_requests(1)
    assert req.records == [raw]  # what the client actually sent


def test_objects_deeper_than_three_levels_become_json_text(o2: FakeOpenObserve) -> None:
    post(o2, [{"a": {"b": {"c": {"d": 1}}}}])
    (stored,) = o2.wait_for_records(1)
    assert stored["a_b_c"] == '{"d":1}'


# --------------------------------------------------------------------------------------------------
# _search
# --------------------------------------------------------------------------------------------------


def _search(
    fake: FakeOpenObserve, body: Dict[str, Any], org: str = "_meta", auth: Any = "default"
) -> requests.Response:
    r: requests.Response = requests.post(
        f"{fake.url}/api/{org}/_search",
        json=body,
        auth=fake.auth if auth == "default" else auth,
        timeout=5,
    )
    return r


def test_search_filters_orders_and_pages(o2: FakeOpenObserve) -> None:
    t0 = now_us() - 60 * 10**6
    post(o2, [{"seq": i, "_timestamp": t0 + i} for i in reversed(range(5))])
    post(o2, [{"seq": 99, "_timestamp": t0 + 1}], stream="other")
    post(o2, [{"seq": 98, "_timestamp": t0 + 1}], org="acme")
    o2.wait_for_records(5)

    def query(start: int, end: int, offset: int, size: int) -> Dict[str, Any]:
        sql = 'SELECT * FROM "audit"'
        return {"query": {"sql": sql, "start_time": start, "end_time": end, "from": offset, "size": size}}

    everything = _search(o2, query(t0, t0 + 100, 0, 100))
    assert everything.status_code == 200
    answer = everything.json()
    assert answer["total"] == 5
    assert answer["took"] == 0
    assert [h["seq"] for h in answer["hits"]] == [0, 1, 2, 3, 4]

    page = _search(o2, query(t0, t0 + 100, 1, 2)).json()
    assert (page["total"], [h["seq"] for h in page["hits"]]) == (5, [1, 2])

    window = _search(o2, query(t0 + 1, t0 + 3, 0, 100)).json()  # end is exclusive
    assert (window["total"], [h["seq"] for h in window["hits"]]) == (2, [1, 2])

    other = {"query": {"sql": "select * from other", "start_time": t0, "end_time": t0 + 100}}
    assert [h["seq"] for h in _search(o2, other).json()["hits"]] == [99]
    acme = {"query": {"sql": "SELECT * FROM audit", "start_time": t0, "end_time": t0 + 100}}
    assert [h["seq"] for h in _search(o2, acme, org="acme").json()["hits"]] == [98]


def test_search_requires_auth_and_a_valid_body(o2: FakeOpenObserve) -> None:
    body = {"query": {"sql": 'SELECT * FROM "audit"', "start_time": 0, "end_time": now_us()}}
    assert _search(o2, body, auth=None).status_code == 401
    assert _search(o2, body, auth=("root@example.com", "nope")).status_code == 401
    assert _search(o2, {"nothing": 1}).status_code == 400
    assert [r.route for r in o2.requests_log] == ["search", "search", "search"]


# --------------------------------------------------------------------------------------------------
# lifecycle
# --------------------------------------------------------------------------------------------------


def test_stop_refuses_connections_and_restart_serves_on_the_same_port() -> None:
    fake = FakeOpenObserve().start()
    try:
        port, url = fake.port, fake.url
        assert url == f"http://127.0.0.1:{port}"
        with requests.Session() as session:
            assert post(fake, recs(1), session=session).status_code == 200  # a pooled keep-alive conn
            fake.stop()
            assert not fake.running
            with pytest.raises(requests.exceptions.ConnectionError):
                post(fake, recs(1), session=session, timeout=2)
            with pytest.raises(ConnectionRefusedError):
                socket.create_connection(("127.0.0.1", port), timeout=2).close()
            fake.restart()
            assert (fake.port, fake.url) == (port, url)
            assert post(fake, recs(1), session=session).status_code == 200
        assert len(fake.records) == 2  # storage survives a restart
    finally:
        fake.stop()
    fake.stop()  # idempotent


def test_fixed_port_and_context_manager() -> None:
    with FakeOpenObserve() as first:
        port = first.port
    with FakeOpenObserve(port=port) as second:
        assert second.port == port
        assert post(second, recs(1)).status_code == 200
    with pytest.raises(requests.exceptions.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_start_twice_is_an_error(o2: FakeOpenObserve) -> None:
    with pytest.raises(RuntimeError):
        o2.start()


def test_wait_helpers_fail_with_a_helpful_message(o2: FakeOpenObserve) -> None:
    o2.respond_status(503)
    post(o2, recs(1))
    with pytest.raises(AssertionError) as records_error:
        o2.wait_for_records(1, timeout=0.1)
    message = str(records_error.value)
    assert "waiting for 1 stored records in _meta/audit; have 0" in message
    assert "POST /api/_meta/audit/_json records=1 -> 503" in message
    with pytest.raises(AssertionError, match="waiting for 2 ingest requests; have 1"):
        o2.wait_for_requests(2, timeout=0.1)


def test_requests_log_entries(o2: FakeOpenObserve) -> None:
    post(o2, recs(1), headers={"X-Custom": "v"})
    (req,) = o2.wait_for_requests(1)
    assert isinstance(req, ReceivedRequest)
    assert req.method == "POST"
    assert req.headers["x-custom"] == "v"
    assert all(k == k.lower() for k in req.headers)
    assert req.headers["authorization"].startswith("Basic ")
    assert req.status == 200
    assert req.json()["code"] == 200
    assert req.answered_at is not None
    assert req.answered_at >= req.time
    assert req.body_size == len(req.body)
