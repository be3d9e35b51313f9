"""``o2audit verify`` (``otel_o2audit.verify``): untouched and tampered trails, from files, stdin and the
loopback fake OpenObserve's ``_search``, in process and through the installed console script."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from o2receiver import FakeOpenObserve

from otel_o2audit.chain import Chain, compute_mac, covered_fields
from otel_o2audit.verify import (
    DEFAULT_MAX_CHECKPOINT_GAP,
    Report,
    VerifyError,
    main,
    parse_time,
    read_jsonl,
    verify_records,
)

KEY_TEXT = "audit-hmac-key-for-tests-0123456789"
KEY = KEY_TEXT.encode()
OTHER_KEY = b"another-key-another-key-another"
PASSWORD = "Complexpass#123"
T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z in µs
SECOND = 1_000_000
REPO = Path(__file__).resolve().parent.parent
Record = Dict[str, Any]


def o2audit_script() -> str:
    for candidate in (Path(sys.prefix) / "bin" / "o2audit", REPO / ".venv" / "bin" / "o2audit"):
        if candidate.exists():
            return str(candidate)
    raise RuntimeError("the o2audit console script is not installed")


def request(i: int, ts: int) -> Record:
    trace = f"{i + 1:032x}"
    span = f"{i + 1:016x}"
    return {
        "_timestamp": ts,
        "user_email": f"user{i}@example.com",
        "org_id": "acme",
        "protocol": "http",
        "http_method": "POST" if i % 3 == 0 else "GET",
        "http_path": f"/api/acme/items/{i}",
        "http_query_params": "",
        "http_body": "",
        "http_response_code": 200 if i % 5 else 403,
        "trace_id": trace,
        "event_id": trace + span,
        "span_id": span,
        "client_ip": "198.51.100.7",
        "duration_ms": round(0.5 + i / 3, 3),
        "service_name": "billing-api",
        "read_only": i % 3 != 0,
    }


def trail(
    requests_per_interval: Tuple[int, ...] = (4, 0, 3, 5),
    *,
    key: bytes = KEY,
    chain_id: Optional[str] = "chain-a",
    start: int = T0,
    interval_s: float = 60,
    close: bool = True,
    first_event: int = 0,
) -> List[Record]:
    """One process's records: each interval's requests, then that interval's checkpoint; a closing one last."""
    now = [start]

    def clock() -> int:
        return now[0]

    chain = Chain(key, chain_id=chain_id, clock=clock, checkpoint_interval=interval_s)
    out: List[Record] = []
    event = itertools.count(first_event)
    for count in requests_per_interval:
        for _ in range(count):
            now[0] += SECOND
            out.append(chain.seal(request(next(event), now[0])))
        now[0] = start + int(interval_s * SECOND) * (len([r for r in out if r["record_type"] == "checkpoint"]) + 1)
        out.append(chain.checkpoint())
    if close:
        now[0] += SECOND
        out.append(chain.checkpoint(closing=True))
    return out


def seq_of(records: List[Record], seq: int) -> int:
    return next(i for i, r in enumerate(records) if r["chain_seq"] == seq)


def checkpoint_seqs(records: List[Record]) -> List[int]:
    return [r["chain_seq"] for r in records if r.get("record_type") == "checkpoint"]


def write(path: Path, records: List[Record]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def env_with_key(**extra: str) -> Dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("O2_AUDIT_")}
    env["O2_AUDIT_HMAC_KEY"] = KEY_TEXT
    env.update(extra)
    return env


def run_json(capsys: pytest.CaptureFixture[str], *args: str, environ: Optional[Mapping[str, str]] = None) -> Any:
    status = main(["--json", *args], environ=env_with_key() if environ is None else environ)
    out = capsys.readouterr()
    report = json.loads(out.out)
    assert report["exit_status"] == status
    assert KEY_TEXT not in out.out + out.err
    assert PASSWORD not in out.out + out.err
    return report


def check(records: List[Record], **options: Any) -> Report:
    return verify_records(records, KEY, **options)


def only_chain(report: Report) -> Any:
    assert len(report.chains) == 1, report.render_text()
    return report.chains[0]


# ----------------------------------------------------------------------------------------------- untouched trails


def test_an_untouched_trail_is_verified(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = trail()
    report = run_json(capsys, str(write(tmp_path / "audit.jsonl", records)))
    assert report["result"] == "verified"
    assert report["exit_status"] == 0
    [chain] = report["chains"]
    assert chain["chain_id"] == "chain-a"
    assert chain["status"] == "verified"
    assert chain["verified"] == [[1, len(records)]]
    assert chain["closed"] is True
    assert chain["closed_at"] == len(records)
    assert chain["checkpoints"] == 5
    assert chain["missing"] == []
    assert chain["modified"] == []
    assert chain["warnings"] == []
    assert report["unchained"]["count"] == 0


def test_several_processes_in_one_file_are_verified_chain_by_chain(tmp_path: Path) -> None:
    one = trail(chain_id="chain-a")
    two = trail((2, 2), chain_id="chain-b", start=T0 + 5 * SECOND, first_event=100)
    mixed = list(itertools.chain.from_iterable(itertools.zip_longest(one, two)))
    report = check([r for r in mixed if r is not None])
    assert report.exit_status == 0, report.render_text()
    assert sorted(c.chain_id for c in report.chains) == ["chain-a", "chain-b"]
    assert all(c.out_of_order == 0 for c in report.chains)


def test_the_text_report_names_the_chain_its_ranges_and_the_verdict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = trail()
    status = main([str(write(tmp_path / "a.jsonl", records))], environ=env_with_key())
    out = capsys.readouterr().out
    assert status == 0
    assert "chain chain-a: VERIFIED: seq 1-" in out
    assert f"verified seq 1-{len(records)}" in out
    assert f"closed at seq {len(records)}" in out
    assert out.rstrip().endswith("result: all chains verified (exit 0)")


# ----------------------------------------------------------------------------------------------- tampering


def test_a_modified_field_is_pinpointed_by_seq_and_event_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = trail()
    victim = records[seq_of(records, 3)]
    victim["user_email"] = "someone-else@example.com"
    report = run_json(capsys, str(write(tmp_path / "a.jsonl", records)))
    assert report["exit_status"] == 1
    assert report["result"] == "tampered"
    [chain] = report["chains"]
    assert chain["modified"] == [{"seq": 3, "event_id": victim["event_id"], "reason": "MAC mismatch"}]
    assert chain["verified"] == [[1, 2], [4, len(records)]]
    assert chain["missing"] == []
    status = main([str(tmp_path / "a.jsonl")], environ=env_with_key())
    text = capsys.readouterr().out
    assert status == 1
    assert f"TAMPERED: modified record: seq 3 event_id={victim['event_id']}: MAC mismatch" in text
    assert "result: TAMPERING FOUND (exit 1)" in text


@pytest.mark.parametrize(
    "change",
    [
        lambda r: r.pop("client_ip"),
        lambda r: r.update(http_response_code=200.5),
        lambda r: r.update(read_only=not r["read_only"]),
        lambda r: r.update(_timestamp=r["_timestamp"] - 1),
        lambda r: r.update(chain_fields=r["chain_fields"].replace("client_ip,", "")),
        lambda r: r.update(chain_mac="0" * 64),
        lambda r: r.pop("chain_mac"),
        lambda r: r.update(chain_seq="4"),
    ],
    ids=["field-removed", "number", "bool", "timestamp", "chain-fields", "mac", "mac-removed", "seq-type"],
)
def test_every_kind_of_change_is_a_modification(change: Callable[[Record], Any]) -> None:
    records = trail()
    victim = records[seq_of(records, 4)]
    change(victim)
    chain = only_chain(check(records))
    assert chain.status == "tampered"
    assert len(chain.modified) == 1
    assert chain.modified[0]["event_id"] == victim["event_id"]


def test_the_physical_order_of_lines_is_not_evidence_but_is_counted(tmp_path: Path) -> None:
    records = trail()
    shuffled = records[:]
    random.Random(7).shuffle(shuffled)
    report = verify_records(read_jsonl([str(write(tmp_path / "a.jsonl", shuffled))])[0], KEY)
    assert report.exit_status == 0, report.render_text()
    chain = only_chain(report)
    assert chain.verified == [(1, len(records))]
    assert chain.out_of_order > 0
    assert any("out of sequence order" in n for n in chain.notes)


def test_reordering_events_means_changing_seq_or_time_and_is_detected() -> None:
    records = trail()
    a, b = records[seq_of(records, 2)], records[seq_of(records, 3)]
    a["chain_seq"], b["chain_seq"] = b["chain_seq"], a["chain_seq"]
    chain = only_chain(check(records))
    assert chain.status == "tampered"
    assert sorted(m["seq"] for m in chain.modified) == [2, 3]

    records = trail()
    a, b = records[seq_of(records, 2)], records[seq_of(records, 3)]
    a["_timestamp"], b["_timestamp"] = b["_timestamp"], a["_timestamp"]
    assert sorted(m["seq"] for m in only_chain(check(records)).modified) == [2, 3]


def test_a_deleted_record_is_a_missing_seq(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = trail()
    del records[seq_of(records, 2)]
    report = run_json(capsys, str(write(tmp_path / "a.jsonl", records)))
    assert report["exit_status"] == 1
    [chain] = report["chains"]
    assert chain["missing"] == [{"first": 2, "last": 2, "count": 1}]
    assert chain["verified"] == [[1, 1], [3, len(records) + 1]]
    assert chain["modified"] == []


def test_a_deleted_checkpoint_is_named_as_a_missing_checkpoint(tmp_path: Path) -> None:
    records = trail()
    first_checkpoint = checkpoint_seqs(records)[0]
    del records[seq_of(records, first_checkpoint)]
    chain = only_chain(check(records))
    assert chain.status == "tampered"
    assert chain.missing == [{"first": first_checkpoint, "last": first_checkpoint, "count": 1,
                              "checkpoints": [first_checkpoint]}]
    assert "including checkpoint(s) seq 5" in " ".join(chain.problems)


def test_a_deleted_whole_interval_records_and_checkpoint_is_detected() -> None:
    records = trail((4, 3, 3, 5))
    checkpoints = checkpoint_seqs(records)
    first, last = checkpoints[1] + 1, checkpoints[2]  # the third interval: 3 requests and its checkpoint
    kept = [r for r in records if not first <= r["chain_seq"] <= last]
    chain = only_chain(check(kept))
    assert chain.status == "tampered"
    # The next surviving checkpoint names the deleted one (checkpoint_prev_seq).
    assert chain.missing == [{"first": first, "last": last, "count": last - first + 1, "checkpoints": [last]}]


def test_deleting_the_first_records_is_detected_unless_the_input_is_partial() -> None:
    records = trail()
    kept = [r for r in records if r["chain_seq"] > 3]
    chain = only_chain(check(kept))
    assert chain.missing == [{"first": 1, "last": 3, "count": 3}]
    partial = check(kept, partial=True)
    assert partial.exit_status == 0, partial.render_text()
    assert only_chain(partial).outside_input == [(1, 3)]


def test_truncation_after_the_last_checkpoint_looks_like_a_crash_and_is_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = trail()
    checkpoints = checkpoint_seqs(records)
    cut = [r for r in records if r["chain_seq"] <= checkpoints[-3] + 2]  # two records after a surviving checkpoint
    report = run_json(capsys, str(write(tmp_path / "a.jsonl", cut)))
    assert report["exit_status"] == 0
    assert report["result"] == "verified"
    [chain] = report["chains"]
    assert chain["closed"] is False
    assert chain["last_checkpoint"] == checkpoints[-3]
    assert chain["uncovered"] == [checkpoints[-3] + 1, checkpoints[-3] + 2]
    assert any("no closing checkpoint" in w and "indistinguishable" in w for w in chain["warnings"])
    status = main([str(tmp_path / "a.jsonl")], environ=env_with_key())
    text = capsys.readouterr().out
    assert status == 0
    assert "WARNING: no closing checkpoint" in text
    assert "result: all chains verified (with warnings) (exit 0)" in text


def test_a_chain_ending_on_a_regular_checkpoint_is_reported_as_not_closed() -> None:
    records = trail(close=False)
    chain = only_chain(check(records))
    assert chain.status == "verified"
    assert chain.closed_at is None
    assert chain.uncovered is None
    assert any("no closing checkpoint" in w for w in chain.warnings)


def test_records_spliced_from_another_chain_or_key_are_detected() -> None:
    ours = trail()
    theirs = trail((3,), chain_id="chain-x", key=OTHER_KEY, first_event=50)
    # 1. Records of a chain signed with another key, kept with their own chain id: that chain does not verify.
    report = check(ours + theirs[:2])
    assert report.exit_status == 1
    forged = next(c for c in report.chains if c.chain_id == "chain-x")
    assert forged.status == "unverifiable"
    assert "signed with another key" in forged.problems[0]
    # 2. The same records relabelled to fill a gap in our chain: modifications.
    spliced = [r for r in ours if r["chain_seq"] != 2]
    stranger = dict(theirs[0], chain_id="chain-a", chain_seq=2)
    spliced.append(stranger)
    chain = only_chain(check(spliced))
    assert [m["seq"] for m in chain.modified] == [2]
    # 3. A record of another chain signed with OUR key (another process), relabelled: still a modification.
    sibling = trail((3,), chain_id="chain-b", first_event=70)
    spliced = [r for r in ours if r["chain_seq"] != 2] + [dict(sibling[1], chain_id="chain-a")]
    assert [m["seq"] for m in only_chain(check(spliced)).modified] == [2]


def test_a_forged_record_inserted_without_the_key_is_detected() -> None:
    records = trail()
    fake = dict(records[seq_of(records, 2)], event_id="f" * 48, user_email="mallory@example.com")
    fake["chain_mac"] = compute_mac(OTHER_KEY, fake, covered_fields(fake) or [])
    records.insert(3, fake)
    chain = only_chain(check(records))
    assert chain.status == "tampered"
    assert chain.modified == [{"seq": 2, "event_id": "f" * 48, "reason": "MAC mismatch"}]
    assert chain.duplicates == 0


def test_records_without_a_chain_are_counted_and_listed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = trail()
    plain = [request(900 + i, T0 + i) for i in range(3)]
    report = run_json(capsys, str(write(tmp_path / "a.jsonl", records + plain)))
    assert report["exit_status"] == 0
    assert report["unchained"]["count"] == 3
    assert report["unchained"]["samples"] == [r["event_id"] for r in plain]
    assert any("carry no chain" in w for w in report["warnings"])
    strict = run_json(capsys, "--require-chain", str(tmp_path / "a.jsonl"))
    assert strict["exit_status"] == 1


def test_stripping_the_chain_from_a_record_leaves_a_gap() -> None:
    records = trail()
    victim = records[seq_of(records, 3)]
    for name in [k for k in victim if k.startswith("chain_")]:
        del victim[name]
    report = check(records)
    assert report.exit_status == 1
    assert report.unchained == 1
    assert only_chain(report).missing == [{"first": 3, "last": 3, "count": 1}]


def test_identical_redeliveries_are_deduplicated_silently(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    records = trail()
    redelivered = records + [dict(r) for r in records[2:9]] + [dict(records[-1])]
    report = run_json(capsys, str(write(tmp_path / "a.jsonl", redelivered)))
    assert report["exit_status"] == 0
    [chain] = report["chains"]
    assert chain["duplicates"] == 8
    assert chain["warnings"] == []
    assert chain["problems"] == []


def test_a_modified_copy_of_a_redelivered_record_is_tampering() -> None:
    records = trail()
    copy = dict(records[seq_of(records, 4)], http_path="/elsewhere")
    chain = only_chain(check([*records, copy]))
    assert chain.status == "tampered"
    assert chain.modified == [{"seq": 4, "event_id": copy["event_id"], "reason": "MAC mismatch"}]
    assert chain.verified == [(1, len(records))]


def test_two_authentic_records_with_one_seq_are_a_conflict() -> None:
    one = trail((3,), close=False)
    two = trail((3,), close=False, first_event=40)  # the same chain id reused (e.g. a fork without a new chain)
    chain = only_chain(check(one + two))
    assert chain.status == "tampered"
    assert chain.conflicts == [1, 2, 3, 4]  # the three requests and the checkpoint after them
    assert any("share seq" in p for p in chain.problems)


def test_records_after_the_closing_checkpoint_are_tampering() -> None:
    records = trail((2,))
    closing = records[-1]["chain_seq"]
    # Someone with a second chain object of the same id and key (only possible with the key) continues it.
    clone = Chain(KEY, chain_id="chain-a", clock=lambda: T0 + 500 * SECOND)
    for record in records[:-1]:
        clone.seal({k: v for k, v in record.items() if not k.startswith("chain_")})
    clone.seal(request(60, T0 + 501 * SECOND))
    extra = clone.seal(request(61, T0 + 502 * SECOND))
    chain = only_chain(check([*records, extra]))
    assert chain.after_close == [closing + 1]
    assert chain.status == "tampered"


def test_a_wrong_key_matches_no_record_and_cannot_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "a.jsonl", trail())
    wrong = env_with_key(O2_AUDIT_HMAC_KEY="not-the-right-key-at-all")
    report = run_json(capsys, str(path), environ=wrong)
    assert report["exit_status"] == 2
    assert report["result"] == "error"
    assert "key does not match any record" in report["errors"][0]
    status = main([str(path)], environ=wrong)
    out = capsys.readouterr().out
    assert status == 2
    assert "key does not match any record" in out
    assert "not-the-right-key" not in out
    assert "COULD NOT CHECK" in out


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "no records"), ("\n\n", "no records"), ("not json\n[1]\n", "no records")],
)
def test_an_empty_or_unreadable_input_cannot_be_checked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text(content)
    report = run_json(capsys, str(path))
    assert report["exit_status"] == 2
    assert message in report["errors"][0]


def test_a_trail_without_any_chain_cannot_be_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = run_json(capsys, str(write(tmp_path / "a.jsonl", [request(1, T0)])))
    assert report["exit_status"] == 2
    assert "no record carries a chain" in report["errors"][0]


def test_malformed_lines_are_skipped_with_a_warning_and_their_loss_shows_as_a_gap(tmp_path: Path) -> None:
    records = trail()
    lines = [json.dumps(r) for r in records]
    lines[2] = lines[2][:40]  # a torn line: the record with seq 3
    lines.insert(5, "\xff garbage")
    path = tmp_path / "a.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    parsed, warnings = read_jsonl([str(path)])
    assert len(parsed) == len(records) - 1
    assert "2 line(s) are not JSON objects" in warnings[0]
    assert "line 3, 6" in warnings[0]
    assert only_chain(verify_records(parsed, KEY)).missing == [{"first": 3, "last": 3, "count": 1}]


def test_a_missing_file_or_key_cannot_be_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(tmp_path / "nope.jsonl")], environ=env_with_key()) == 2
    assert "cannot read" in capsys.readouterr().err
    path = write(tmp_path / "a.jsonl", trail())
    no_key = {k: v for k, v in env_with_key().items() if k != "O2_AUDIT_HMAC_KEY"}
    assert main([str(path)], environ=no_key) == 2
    assert "no key" in capsys.readouterr().err
    assert main([str(path)], environ=env_with_key(O2_AUDIT_HMAC_KEY="short")) == 2
    err = capsys.readouterr().err
    assert "at least 16 bytes" in err
    assert "short" not in err.replace("at least", "")
    assert main([], environ=env_with_key()) == 2
    assert "give FILE(s) or --from-openobserve" in capsys.readouterr().err
    assert main(["--start", "-1h", str(path)], environ=env_with_key()) == 2
    assert "a file is verified whole" in capsys.readouterr().err
    assert main(["--bogus"], environ=env_with_key()) == 2
    capsys.readouterr()
    assert main(["--help"], environ=env_with_key()) == 0
    assert "Exit status" in capsys.readouterr().out


def test_the_key_can_come_from_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path / "a.jsonl", trail())
    key_file = tmp_path / "key"
    key_file.write_text(KEY_TEXT + "\n")
    no_key = {k: v for k, v in env_with_key().items() if k != "O2_AUDIT_HMAC_KEY"}
    assert main(["--key-file", str(key_file), str(path)], environ=no_key) == 0
    capsys.readouterr()
    # --key-file wins over a wrong key in the environment.
    assert main(["--key-file", str(key_file), str(path)], environ=env_with_key(O2_AUDIT_HMAC_KEY="x" * 20)) == 0
    capsys.readouterr()
    env_file = env_with_key(O2_AUDIT_HMAC_KEY_FILE=str(key_file))
    del env_file["O2_AUDIT_HMAC_KEY"]
    assert main([str(path)], environ=env_file) == 0
    capsys.readouterr()
    short = tmp_path / "short"
    short.write_text("tiny\n")
    assert main(["--key-file", str(short), str(path)], environ=no_key) == 2
    assert "shorter than 16 bytes" in capsys.readouterr().err


def test_several_files_and_stdin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    records = trail()
    first = write(tmp_path / "a.jsonl", records[:7])
    rest = "".join(json.dumps(r) + "\n" for r in records[7:]).encode()
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(rest)))
    assert main([str(first), "-"], environ=env_with_key()) == 0


# ----------------------------------------------------------------------------------------------- honest losses


def test_losses_the_application_declared_are_warnings_not_tampering() -> None:
    now = [T0]
    chain = Chain(KEY, chain_id="lossy", clock=lambda: now[0])
    records = [chain.seal(request(i, T0 + i)) for i in range(10)]
    lost = records[3:6]  # a batch the sink could not deliver
    chain.note_lost(lost)
    chain.note_dropped(4)
    records.append(chain.checkpoint(closing=True))
    delivered = [r for r in records if r not in lost]
    report = check(delivered)
    assert report.exit_status == 0, report.render_text()
    result = only_chain(report)
    assert result.declared_lost == [(4, 6)]
    assert result.dropped == 4
    assert any("declared" in w and "not tampering" in w for w in result.warnings)
    # One more record deleted inside the declared range exceeds the declaration: tampering.
    fewer = [r for r in delivered if r["chain_seq"] != 7]
    assert only_chain(check(fewer)).missing == [{"first": 7, "last": 7, "count": 1}]
    partly = Chain(KEY, chain_id="partly", clock=lambda: now[0])
    batch = [partly.seal(request(i, T0 + i)) for i in range(6)]
    partly.note_lost(batch, count=2)  # the server rejected 2 of 6, we do not know which
    batch.append(partly.checkpoint(closing=True))
    assert check([r for r in batch if r["chain_seq"] not in (2, 5)]).exit_status == 0
    assert check([r for r in batch if r["chain_seq"] not in (2, 3, 5)]).exit_status == 1


def test_a_stretch_without_checkpoints_but_without_gaps_is_a_warning() -> None:
    records = trail((2, 2, 2), interval_s=60)
    checkpoints = checkpoint_seqs(records)
    # The process stalled: everything after the first checkpoint happened 10 minutes later (re-sealed).
    now = [T0]
    chain = Chain(KEY, chain_id="stall", clock=lambda: now[0], checkpoint_interval=60)
    out = []
    for record in records[:-1]:
        fresh = {k: v for k, v in record.items() if not k.startswith(("chain_", "checkpoint_"))}
        if record["chain_seq"] > checkpoints[0]:
            fresh["_timestamp"] += 600 * SECOND
        now[0] = fresh["_timestamp"]
        out.append(chain.seal(fresh) if record["record_type"] != "checkpoint" else chain.checkpoint())
    out.append(chain.checkpoint(closing=True))
    chain_report = only_chain(check(out))
    assert chain_report.status == "verified"
    assert len(chain_report.checkpoint_gaps) == 1
    assert chain_report.checkpoint_gaps[0]["after_seq"] == checkpoints[0]
    assert any("no checkpoint for" in w for w in chain_report.warnings)
    assert check(out, max_checkpoint_gap=3600).chains[0].checkpoint_gaps == []


def test_the_checkpoint_gap_defaults_to_twice_the_declared_interval() -> None:
    assert check(trail(interval_s=45)).max_checkpoint_gap == 90
    legacy = [r for r in trail() if r["record_type"] != "checkpoint"]
    assert check(legacy).max_checkpoint_gap == DEFAULT_MAX_CHECKPOINT_GAP


def test_fields_added_after_sealing_are_reported_as_unsigned() -> None:
    records = trail()
    records[2]["injected"] = "value"
    records[3]["server_column"] = None
    chain = only_chain(check(records))
    assert chain.status == "verified"
    assert chain.unsigned_fields == {"injected": 1}


# ----------------------------------------------------------------------------------------------- time ranges


def test_parse_time_forms() -> None:
    now = 1_767_225_600.0
    assert parse_time("now", now) == int(now * 1e6)
    assert parse_time("-1h", now) == int((now - 3600) * 1e6)
    assert parse_time("-90m", now) == int((now - 5400) * 1e6)
    assert parse_time("-2d", now) == int((now - 172800) * 1e6)
    assert parse_time("1767225600", now) == 1_767_225_600_000_000
    assert parse_time("1767225600.5", now) == 1_767_225_600_500_000
    assert parse_time("2026-01-01T00:00:00Z", now) == 1_767_225_600_000_000
    assert parse_time("2026-01-01T01:00:00+01:00", now) == 1_767_225_600_000_000
    for bad in ("yesterday", "2026-01-01T00:00:00", "-1y", ""):
        with pytest.raises(VerifyError):
            parse_time(bad, now)


def test_with_a_time_range_chains_may_begin_and_end_outside_it() -> None:
    records = trail((4, 4, 4, 4), close=False)
    checkpoints = checkpoint_seqs(records)
    start = records[seq_of(records, checkpoints[0])]["_timestamp"]
    end = records[seq_of(records, checkpoints[2])]["_timestamp"] + 1
    inside = [r for r in records if start <= r["_timestamp"] < end]
    report = check(inside, window=(start, end))
    assert report.exit_status == 0, report.render_text()
    chain = only_chain(report)
    assert chain.outside_input == [(1, checkpoints[0] - 1)]
    assert any("may continue after the time range" in w for w in chain.warnings) or chain.uncovered is None
    # A deletion between two records inside the range is still judged.
    del inside[3]
    assert check(inside, window=(start, end)).exit_status == 1


def test_a_gap_that_touches_the_margin_outside_the_range_is_not_judged() -> None:
    records = trail((4, 4), close=False)
    start = records[3]["_timestamp"]
    fetched = [r for r in records if r["chain_seq"] != 3]  # seq 3 lies before the range (in the margin)
    report = check(fetched, window=(start, T0 + 10_000 * SECOND))
    assert report.exit_status == 0, report.render_text()
    assert (3, 3) in only_chain(report).outside_input


# ----------------------------------------------------------------------------------------------- property


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    intervals=st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=5),
    op=st.sampled_from(["modify", "delete", "swap-seq", "duplicate", "shuffle", "delete-last"]),
    data=st.data(),
)
def test_random_tampering_anywhere_is_always_detected(intervals: List[int], op: str, data: Any) -> None:
    records = trail(tuple(intervals))
    n = len(records)
    if op == "modify":
        victim = records[data.draw(st.integers(0, n - 1))]
        fields = covered_fields(victim) or []
        name = data.draw(st.sampled_from([f for f in fields if f != "chain_fields"]))
        value = victim[name]
        if isinstance(value, bool):
            victim[name] = not value
        elif isinstance(value, (int, float)):
            victim[name] = value + data.draw(st.integers(1, 10**6))
        else:
            victim[name] = value + data.draw(st.text(min_size=1, max_size=5))
        expected = 1
    elif op == "delete":  # anything but the last record is covered by a surviving checkpoint
        del records[data.draw(st.integers(0, n - 2))]
        expected = 1
    elif op == "swap-seq":
        i, j = data.draw(st.lists(st.integers(0, n - 1), min_size=2, max_size=2, unique=True))
        records[i]["chain_seq"], records[j]["chain_seq"] = records[j]["chain_seq"], records[i]["chain_seq"]
        expected = 1
    elif op == "duplicate":
        records.insert(data.draw(st.integers(0, n)), dict(records[data.draw(st.integers(0, n - 1))]))
        expected = 0
    elif op == "shuffle":
        random.Random(data.draw(st.integers())).shuffle(records)
        expected = 0
    else:  # cutting the chain after its last surviving checkpoint looks like a crash
        records.pop()
        expected = 0
    report = check(records)
    if expected and report.exit_status == 2:  # a trail of two records, both altered: no record verifies
        assert len(records) == 2, report.render_text()
        assert "does not match any record" in report.errors[0]
    else:
        assert report.exit_status == expected, (op, report.render_text())
    if op == "delete-last":
        assert any("no closing checkpoint" in w for w in report.chains[0].warnings)


# ----------------------------------------------------------------------------------------------- OpenObserve


@pytest.fixture
def o2() -> Iterator[FakeOpenObserve]:
    fake = FakeOpenObserve(password=PASSWORD).start()
    try:
        yield fake
    finally:
        fake.stop()
    assert fake.server_errors == []


def ingest(fake: FakeOpenObserve, records: List[Record], stream: str = "audit") -> None:
    body = gzip.compress(json.dumps(records).encode())
    response = requests.post(
        fake.ingest_url(stream=stream),
        data=body,
        auth=fake.auth,
        headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"][0]["failed"] == 0, response.text


def live_trail(**options: Any) -> List[Record]:
    return trail(start=time.time_ns() // 1000 - 1800 * SECOND, interval_s=60, **options)


def o2_env(fake: FakeOpenObserve, **extra: str) -> Dict[str, str]:
    settings = {"O2_AUDIT_ENDPOINT": fake.url, "O2_AUDIT_USER": fake.user, "O2_AUDIT_PASSWORD": fake.password}
    settings.update(extra)
    return env_with_key(**settings)


def test_verify_reads_openobserve_with_search_paged(o2: FakeOpenObserve, capsys: pytest.CaptureFixture[str]) -> None:
    records = live_trail()
    ingest(o2, records[:6])
    ingest(o2, records[6:])
    ingest(o2, [request(500, time.time_ns() // 1000 - 60 * SECOND)])  # an unchained event in the same stream
    report = run_json(capsys, "--from-openobserve", "--start", "-1h", "--page-size", "4", environ=o2_env(o2))
    assert report["exit_status"] == 0, report
    assert report["records"] == len(records) + 1
    assert report["unchained"]["count"] == 1
    [chain] = report["chains"]
    assert chain["verified"] == [[1, len(records)]]
    assert chain["closed"] is True
    searches = [r for r in o2.requests_log if r.route == "search"]
    assert len(searches) == (len(records) + 1) // 4 + 1
    query = json.loads(searches[0].body)["query"]
    assert query["sql"] == 'SELECT * FROM "audit" ORDER BY _timestamp ASC'
    assert query["end_time"] - query["start_time"] == pytest.approx((3600 + 2 * 900) * SECOND, abs=5 * SECOND)
    assert all(r.headers["authorization"].startswith("Basic ") for r in searches)


def test_verify_from_openobserve_finds_a_deletion_and_honours_overrides(
    o2: FakeOpenObserve, capsys: pytest.CaptureFixture[str]
) -> None:
    records = live_trail()
    ingest(o2, [r for r in records if r["chain_seq"] != 4], stream="other")
    ingest(o2, records)  # the untouched copy in the default stream
    env = o2_env(o2, O2_AUDIT_ENDPOINT="http://127.0.0.1:9")  # overridden by --endpoint
    report = run_json(
        capsys, "--from-openobserve", "--start", "-2h", "--end", "now", "--endpoint", o2.url, "--stream", "other",
        environ=env,
    )
    assert report["exit_status"] == 1
    # seq 4 is the last request before checkpoint 5, which says so (chain_last_seq).
    assert report["chains"][0]["missing"] == [{"first": 4, "last": 4, "count": 1, "requests": [4]}]
    assert run_json(capsys, "--from-openobserve", "--start", "-2h", "--endpoint", o2.url, environ=env)[
        "exit_status"
    ] == 0


def test_verify_from_openobserve_reports_http_errors_without_secrets(
    o2: FakeOpenObserve, capsys: pytest.CaptureFixture[str]
) -> None:
    ingest(o2, live_trail())
    wrong = o2_env(o2, O2_AUDIT_PASSWORD="wrong-" + PASSWORD)
    report = run_json(capsys, "--from-openobserve", "--start", "-1h", environ=wrong)
    assert report["exit_status"] == 2
    assert "HTTP 401" in report["errors"][0]
    assert "wrong-" not in json.dumps(report)
    empty = run_json(capsys, "--from-openobserve", "--start", "-1h", "--org", "nobody", environ=o2_env(o2))
    assert empty["exit_status"] == 2
    assert "no records" in empty["errors"][0]
    missing = run_json(capsys, "--from-openobserve", environ=o2_env(o2))
    assert missing["exit_status"] == 2
    assert "--start" in missing["errors"][0]
    no_password = {k: v for k, v in o2_env(o2).items() if k != "O2_AUDIT_PASSWORD"}
    report = run_json(capsys, "--from-openobserve", "--start", "-1h", environ=no_password)
    assert report["exit_status"] == 2
    assert "O2_AUDIT_PASSWORD" in report["errors"][0]
    backwards = run_json(capsys, "--from-openobserve", "--start", "now", "--end", "-1h", environ=o2_env(o2))
    assert backwards["exit_status"] == 2
    o2.stop()
    down = run_json(capsys, "--from-openobserve", "--start", "-1h", environ=o2_env(o2))
    assert down["exit_status"] == 2
    assert "cannot reach" in down["errors"][0]


# ----------------------------------------------------------------------------------------------- console script


def test_the_console_script_verifies_a_file_and_prints_json(tmp_path: Path) -> None:
    good = write(tmp_path / "good.jsonl", trail())
    tampered_records = trail()
    tampered_records[2]["http_path"] = "/api/acme/other"
    bad = write(tmp_path / "bad.jsonl", tampered_records)
    script = o2audit_script()
    done = subprocess.run([script, "verify", str(good)], env=env_with_key(), capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "VERIFIED" in done.stdout
    assert KEY_TEXT not in done.stdout + done.stderr
    done = subprocess.run([script, "verify", "--json", str(bad)], env=env_with_key(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["chains"][0]["modified"][0]["seq"] == tampered_records[2]["chain_seq"]
    done = subprocess.run([script, "verify", "-"], env=env_with_key(), input=good.read_text(), capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr


def test_the_console_script_reads_openobserve_from_the_environment(o2: FakeOpenObserve) -> None:
    ingest(o2, live_trail())
    done = subprocess.run(
        [o2audit_script(), "verify", "--from-openobserve", "--start", "-1h", "--json"],
        env=o2_env(o2),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert json.loads(done.stdout)["result"] == "verified"
    assert PASSWORD not in done.stdout + done.stderr
    assert KEY_TEXT not in done.stdout + done.stderr


def test_hostile_values_neither_crash_the_verifier_nor_forge_report_lines(capsys: pytest.CaptureFixture[str]) -> None:
    records = trail()
    records[1]["chain_mac"] = "\u00e9" * 64  # not ASCII: compare_digest would raise on it
    records[2]["event_id"] = "x\nresult: all chains verified (exit 0)\x1b[2J"
    records[2]["user_email"] = "changed"
    records.append(dict(records[0], chain_id="evil\nchain", chain_seq=[1], chain_fields={"a": 1}))
    records.append({"event_id": "plain\rrecord", "_timestamp": "soon"})
    report = check(records)
    assert report.exit_status == 1
    text = report.render_text()
    assert text.count("\n") == len(text.splitlines())
    assert not any(line.startswith("result:") for line in text.splitlines()[:-1])
    assert "\\nresult: all chains verified" in text
    assert "\x1b" not in text
    assert "evil\\nchain" in text
    json.dumps(report.to_dict())  # the JSON report is always serializable


def test_seal_survives_values_json_cannot_sort() -> None:
    record = Chain(KEY).seal({"_timestamp": T0, "mixed": {1: "a", "b": 2}})
    assert isinstance(record["mixed"], str)
    assert only_chain(check([record])).verified == [(1, 1)]
