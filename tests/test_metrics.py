"""Loss accounting (issue 3, item 6): the ``o2audit.records`` OTel counter and the loss log lines.

* ``o2audit.records`` (meter ``otel_o2audit``, attribute ``outcome``) against a GLOBAL MeterProvider with an
  InMemoryMetricReader, in a subprocess (tests/apps_extra/metrics_probe.py) because the global meter provider
  can be set only once: a point for every key of ``COUNTER_KEYS``, values equal to ``stats()``, whether the
  provider is set before or after ``install()``.
* Zero-code: the console metric exporter of ``opentelemetry-instrument`` shows the counter, on the processor
  path (``O2_AUDIT_ENABLED=true``) and on the exporter path (``OTEL_TRACES_EXPORTER=o2audit``).
* Loss log lines: drops forced with a tiny ``max_queue_size`` while FakeOpenObserve holds the batch in flight
  are logged at WARNING with their count, rate-limited, never as "0 records", and add up to the counter.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest
from fastapi.testclient import TestClient
from inproc import Counters, Harness, assert_stays, make_app, wait_until
from o2receiver import FakeOpenObserve
from procs import REPO_ROOT, Launcher, child_env, read_jsonl
from procs import wait_until as wait_proc

import otel_o2audit
from otel_o2audit import COUNTER_KEYS

LOGGER = "otel_o2audit"
# "<n> audit records ..." and "<n> of <m> audit records ..."
_COUNT = re.compile(r"(\d+) (?:of \d+ )?audit records")
_ZERO = re.compile(r"(?<![\d.])0 (?:of \d+ )?(?:audit )?records?\b")


# ----------------------------------------------------------------------------------------- OTel counter
def run_probe(mode: str, tmp_path: Path) -> Dict[str, Any]:
    audit = tmp_path / "audit.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "tests.apps_extra.metrics_probe", mode, str(audit)],
        cwd=REPO_ROOT, env=child_env(), capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, f"probe failed ({result.returncode}):\n{result.stderr[-4000:]}"
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON from the probe:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    out: Dict[str, Any] = json.loads(lines[-1])
    out["audit"] = read_jsonl(audit)
    return out


@pytest.mark.parametrize("mode", ["before", "after"], ids=["meter-provider-before-install",
                                                           "meter-provider-after-install"])
def test_records_counter_has_every_outcome_and_equals_stats(mode: str, tmp_path: Path) -> None:
    probe = run_probe(mode, tmp_path)
    assert probe["keys"] == list(COUNTER_KEYS)
    expected_captured = [3, 5]
    for number, round_ in enumerate(probe["rounds"]):
        stats = round_["stats_before"]
        assert round_["stats_after"] == stats, "the pipeline was idle: nothing may change during the collection"
        (metric,) = round_["metrics"]
        assert metric["scope"] == "otel_o2audit"
        assert metric["type"] == "Sum"
        assert metric["monotonic"] is True, "an observable COUNTER"
        assert metric["temporality"] == "CUMULATIVE"
        assert metric["unit"] == "{record}"
        points = metric["points"]
        assert all(set(p["attributes"]) == {"outcome"} for p in points), points
        by_outcome = {p["attributes"]["outcome"]: p["value"] for p in points}
        assert len(points) == len(by_outcome), f"one point per outcome: {points}"
        assert set(by_outcome) == set(COUNTER_KEYS), "a point for every key, zeros included"
        assert by_outcome == stats
        assert stats["captured"] == stats["published"] == expected_captured[number]
        assert stats["skipped"] == [1, 3][number]
    assert len(probe["audit"]) == 5


# ------------------------------------------------------------------------------- zero-code, console metrics
def _metric_exports(text: str) -> List[Dict[str, Any]]:
    """The JSON documents the console metric exporter printed, in order."""
    decoder = json.JSONDecoder()
    out: List[Dict[str, Any]] = []
    index = 0
    while True:
        start = text.find('{\n    "resource_metrics"', index)
        if start < 0:
            return out
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:  # the last document may still be being written
            return out
        out.append(value)
        index = end


def _metric_names(export: Dict[str, Any]) -> List[str]:
    return [m["name"] for rm in export["resource_metrics"] for sm in rm["scope_metrics"] for m in sm["metrics"]]


def _records_points(export: Dict[str, Any]) -> Optional[Dict[str, int]]:
    for rm in export["resource_metrics"]:
        for sm in rm["scope_metrics"]:
            for metric in sm["metrics"]:
                if metric["name"] == "o2audit.records":
                    assert sm["scope"]["name"] == "otel_o2audit", sm["scope"]
                    return {p["attributes"]["outcome"]: p["value"] for p in metric["data"]["data_points"]}
    return None


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    pool = Launcher(tmp_path)
    try:
        yield pool
    finally:
        pool.cleanup()


@pytest.mark.parametrize("path", ["processor", "exporter"])
def test_zero_code_console_metrics_show_the_records_counter(launcher: Launcher, tmp_path: Path, path: str) -> None:
    """README: the counts are exported as ``o2audit.records`` "whenever a MeterProvider is configured". Both
    zero-code paths update ``stats()``; both must export the counter."""
    audit = tmp_path / "audit.jsonl"
    common = {"O2_AUDIT_ENDPOINT": f"file://{audit}", "O2_AUDIT_PUBLISH_INTERVAL": "0.2",
              "OTEL_METRICS_EXPORTER": "console", "OTEL_METRIC_EXPORT_INTERVAL": "200",
              "OTEL_BSP_SCHEDULE_DELAY": "100"}
    if path == "processor":
        env = child_env({"O2_AUDIT_ENABLED": "true", **common})
    else:
        env = child_env({"OTEL_TRACES_EXPORTER": "o2audit", **common})
    app = launcher.uvicorn(env, "tests.apps_extra.sampling_app:app").wait_ready()
    for i in range(3):
        assert app.fresh_request("GET", f"/api/acme/items/{i}").status_code == 200
    wait_proc(lambda: len(read_jsonl(audit)) >= 3, 15, lambda: f"3 records in {audit}{app.tail()}")
    # The counters are final once the records are in the file; wait for two more exports after that.
    seen = len(_metric_exports(app.stdout()))
    wait_proc(lambda: len(_metric_exports(app.stdout())) >= seen + 2, 15,
              lambda: f"two more console metric exports{app.tail()}")
    latest = _metric_exports(app.stdout())[-1]
    assert any(name.startswith("http.server") for name in _metric_names(latest)), (
        f"the console metric exporter works in this process: {_metric_names(latest)}")
    points = _records_points(latest)
    assert points is not None, (f"no o2audit.records in the {path} path's metrics (have {_metric_names(latest)}), "
                                f"although the records were counted")
    assert set(points) == set(COUNTER_KEYS)
    assert points["captured"] == 3
    assert points["published"] == 3
    assert len(read_jsonl(audit)) == 3


# ------------------------------------------------------------------------------------------- loss logging
def loss_lines(caplog: pytest.LogCaptureFixture) -> List[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.WARNING]


def dropped_counts(caplog: pytest.LogCaptureFixture) -> List[int]:
    counts = []
    for record in loss_lines(caplog):
        message = record.getMessage()
        if "DROPPED" in message:
            match = _COUNT.search(message)
            assert match is not None, message
            counts.append(int(match.group(1)))
    return counts


def assert_no_zero_counts(caplog: pytest.LogCaptureFixture) -> None:
    for record in caplog.records:
        if record.name != LOGGER:
            continue
        message = record.getMessage()
        assert not _ZERO.search(message), f"a loss summarized to zero: {message!r}"
        for match in _COUNT.finditer(message):
            if record.levelno >= logging.WARNING:
                assert int(match.group(1)) > 0, message


def test_drops_are_logged_with_counts_rate_limited_and_add_up(harness: Harness, receiver: FakeOpenObserve,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    provider = harness.provider()
    processor = harness.install(provider, receiver, batch_size=1, max_queue_size=1, publish_interval=0.05)
    counters = Counters()
    receiver.hold()
    with TestClient(make_app(provider, native=False, mount=False)) as client:
        assert client.get("/api/acme/things/0").status_code == 200
        # Its record is now in flight, held by the receiver: the queue (pending + in flight) is full.
        receiver.wait_until(lambda: any(r.state == "held" for r in receiver.ingestion_requests()), 5,
                            "the first batch to be held")
        for i in range(1, 6):
            assert client.get(f"/api/acme/things/{i}").status_code == 200, "a drop never fails the request"
        wait_until(lambda: dropped_counts(caplog), 5, "a first DROPPED warning")
        first = dropped_counts(caplog)
        # More drops inside the 10 s window: counted, not yet logged (rate limit).
        for i in range(6, 10):
            assert client.get(f"/api/acme/things/{i}").status_code == 200
        # (The queue bound is read racily on the request path: allow one request slipping in at the edge.)
        dropped = counters["dropped"]
        assert dropped >= 8, counters.delta()
        assert_stays(lambda: dropped_counts(caplog) == first, 0.3, "the rate limit")
        receiver.release()
        assert processor.force_flush(5000) is True
    processor.shutdown()  # the final, forced summary

    delta = counters.delta()
    counts = dropped_counts(caplog)
    assert sum(counts) == delta["dropped"] == dropped, counts
    assert 2 <= len(counts) < dropped, f"rate-limited: a few summaries, not one line per drop: {counts}"
    for record in loss_lines(caplog):
        if "DROPPED" in record.getMessage():
            assert record.levelno == logging.WARNING
            assert "O2_AUDIT_MAX_QUEUE_SIZE=1" in record.getMessage(), "the reason is named"
    assert_no_zero_counts(caplog)
    assert delta["captured"] + delta["dropped"] == 10
    assert delta["published"] == delta["captured"]
    assert delta["lost"] == 0
    stored = [r["http_path"] for r in receiver.records_for()]
    assert stored[0] == "/api/acme/things/0"
    assert len(stored) == delta["captured"]


def test_lost_records_are_logged_with_counts_and_reason(harness: Harness, receiver: FakeOpenObserve,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A held batch at shutdown, plus records still pending behind it: every loss logged, with a count."""
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    provider = harness.provider()
    processor = harness.install(provider, receiver, batch_size=1, max_queue_size=50, publish_interval=0.05,
                                timeout=0.3, shutdown_timeout=0.6)
    counters = Counters()
    receiver.hold()
    with TestClient(make_app(provider, native=False, mount=False)) as client:
        for i in range(4):
            assert client.get(f"/api/acme/things/{i}").status_code == 200
        receiver.wait_until(lambda: any(r.state == "held" for r in receiver.ingestion_requests()), 5,
                            "the first batch to be held")
        wait_until(lambda: counters["captured"] == 4, 5, "all four records captured")
    processor.shutdown(timeout_millis=600)

    delta = counters.delta()
    assert delta["captured"] == 4
    assert delta["published"] == 0
    assert delta["lost"] == 4, delta
    lines = [r for r in loss_lines(caplog) if "LOST" in r.getMessage()]
    assert lines, [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert all(r.levelno >= logging.WARNING for r in lines)
    assert_no_zero_counts(caplog)
    text = "\n".join(r.getMessage() for r in lines)
    assert receiver.password not in text
    per_batch = [r for r in lines if re.search(r"\d+ of \d+ audit records LOST", r.getMessage())]
    assert per_batch, f"the in-flight batch's loss names its count and reason: {text}"
    assert all("attempt" in r.getMessage() for r in per_batch), text


def test_stats_keys_are_the_documented_ones() -> None:
    """issue 3 item 6: at least these keys; stats() and COUNTER_KEYS agree."""
    required = {"captured", "published", "retried", "spooled", "replayed", "dropped", "expired", "rejected", "lost"}
    assert required <= set(COUNTER_KEYS)
    assert set(otel_o2audit.stats()) == set(COUNTER_KEYS)
