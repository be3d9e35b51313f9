"""``o2audit verify``: check the tamper-evidence chains of an audit trail (see ``chain.py``).

Usage::

    o2audit verify [--json] [--key-file PATH] FILE [FILE ...]        # JSON lines; "-" reads stdin
    o2audit verify [--json] [--key-file PATH] --from-openobserve --start -24h [--end now]
                   [--endpoint URL] [--org ORG] [--stream STREAM] [--user USER]

The key comes from ``--key-file`` or ``O2_AUDIT_HMAC_KEY`` / ``O2_AUDIT_HMAC_KEY_FILE``; for OpenObserve the
endpoint, org, stream, user, password (``O2_AUDIT_PASSWORD`` or ``O2_AUDIT_PASSWORD_FILE``, never an option),
CA bundle, client certificate and timeout come from the same ``O2_AUDIT_*`` variables as the application's.
Times are RFC 3339 (``2026-08-01T12:00:00Z``), epoch seconds, ``now``, or relative (``-90m``, ``-1h``, ``-7d``).

Records are grouped by ``chain_id`` and ordered by ``chain_seq``; for each chain the report gives the
verified ranges, modified records (MAC mismatch: seq and event_id), missing sequence numbers (naming the
missing checkpoints among them), broken links, records after the closing checkpoint, conflicting copies
of one seq, stretches without a checkpoint, and whether the chain ends with a closing checkpoint.
Identical re-deliveries of a record (at-least-once delivery) are de-duplicated silently. Exit status: 0 all
verified (warnings allowed), 1 tampering found, 2 could not check (no key or a bad key, unreadable input,
an HTTP error, no chained records, or a key that matches no record).

Threat model. The attacker can read, modify, delete, reorder and insert stored records (a compromised
OpenObserve account, someone with write access to the file or the storage), but does not have the HMAC key.
Detected:

* modification of any covered field of any record (all fields the record had when sealed; columns added
  later are listed as unsigned, not trusted): MAC mismatch;
* insertion of forged records into a chain, or of whole forged chains (no record verifies): MAC mismatch;
* deletion of records or checkpoints anywhere before the chain's last surviving record, including whole
  publish intervals (records AND their checkpoint): a gap in ``chain_seq``, with the missing checkpoints
  named (each checkpoint states the seq of the previous one);
* reordering: the order of events is ``chain_seq`` (and ``_timestamp``), both covered by the MAC, so moving
  an event means changing them, which is a modification. The physical order of lines or rows carries no
  meaning (concurrent writers, spool replays and OpenObserve's ordering by time all shuffle it) and is only
  counted;
* a record of another chain, or another trail, spliced in with a changed ``chain_id`` or ``chain_seq``
  (MAC mismatch), or with its own chain id when signed with another key (its chain does not verify);
* deletion of the chain's first records (a chain must start at seq 1), unless ``--partial`` or a time range
  says the input may start in the middle of a chain.

Not detected (by design or by nature):

* anything done by someone who holds the key: they can re-sign a whole forged trail. Keep the key out of
  OpenObserve's reach (a secret mount readable by the application only) and rotate it if exposed;
* truncation after the last surviving checkpoint: cutting a chain's tail looks exactly like a crash (no
  closing checkpoint); it is reported as a WARNING naming the last checkpoint and the records after it.
  At most one publish interval (plus the delivery delay) of records can vanish this way unnoticed, unless a
  later checkpoint survives;
* deletion of an entire chain (every record of one process run): the verifier cannot know it existed,
  except that checkpoints of OTHER chains may still declare losses of it;
* replay: copying a whole authentic chain, or authentic records, into another stream or trail signed with
  the same key (use one key per trail);
* records without a chain (from a process running without a key, or OpenObserve's own audit events) are
  counted and listed, never trusted; ``--require-chain`` makes them a failure;
* fields whose value was ``""`` may be dropped (a server may drop empty values), which changes nothing;
  numbers are compared to 6 decimal places (``2`` equals ``2.0``);
* with a time range, only what lies inside is judged: a gap is reported as missing only between two records
  inside the range, and a chain may begin or end outside it.

Losses the application itself declared (records it sealed but could not deliver, and records it dropped
before sealing) are stated by its checkpoints and reported as warnings, not as tampering: an attacker
cannot forge such a declaration without the key, and a declaration bounds how many records may be missing.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import IO, Any, Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple
from urllib.parse import quote

from .chain import CHECKPOINT, MIN_KEY_BYTES, covered_fields, parse_lost, verify_mac
from .config import ConfigError, O2AuditConfig

__all__ = ["ChainReport", "Report", "VerifyError", "main", "parse_time", "read_jsonl", "verify_records"]

EXIT_OK = 0
EXIT_TAMPERED = 1
EXIT_ERROR = 2

#: Without checkpoints stating their interval, at most this many seconds may pass between two of them.
DEFAULT_MAX_CHECKPOINT_GAP = 1200.0
#: With a time range, records this many seconds before and after it are read too (sealing order and
#: ``_timestamp`` order differ by at most the time a record waits in the queue).
DEFAULT_MARGIN = 900.0
DEFAULT_PAGE_SIZE = 1000
_MAX_LISTED = 20

_ENV_FOR_OPENOBSERVE = (
    "O2_AUDIT_ENDPOINT",
    "O2_AUDIT_ORG",
    "O2_AUDIT_STREAM",
    "O2_AUDIT_USER",
    "O2_AUDIT_PASSWORD",
    "O2_AUDIT_PASSWORD_FILE",
    "O2_AUDIT_CA_BUNDLE",
    "O2_AUDIT_CLIENT_CERT",
    "O2_AUDIT_CLIENT_KEY",
    "O2_AUDIT_TIMEOUT",
)
_ENV_FOR_KEY = ("O2_AUDIT_HMAC_KEY", "O2_AUDIT_HMAC_KEY_FILE")
_RELATIVE_RE = re.compile(r"^-\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw])$")
_EPOCH_RE = re.compile(r"^[0-9]+(?:\.[0-9]+)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}

Range = Tuple[int, int]


class VerifyError(Exception):
    """The trail could not be checked (exit status 2); the message never holds a secret."""


# ----------------------------------------------------------------------------------------------- helpers


def _as_seq(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 1 else None
    if isinstance(value, float) and math.isfinite(value) and value.is_integer() and value >= 1:
        return int(value)
    return None


def _as_int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return None


def _as_float(value: Any) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _safe(value: Any, limit: int = 100) -> str:
    """``value`` as one printable line: stored records are attacker-controlled text."""
    text = str(value)[:limit]
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _iso(us: Optional[int]) -> str:
    if us is None:
        return "?"
    try:
        return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    except (OverflowError, OSError, ValueError):
        return str(us)


def _ranges(values: Iterable[int]) -> List[Range]:
    out: List[Range] = []
    for value in sorted(set(values)):
        if out and value == out[-1][1] + 1:
            out[-1] = (out[-1][0], value)
        else:
            out.append((value, value))
    return out


def _range_text(ranges: Sequence[Range], limit: int = _MAX_LISTED) -> str:
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in ranges[:limit]]
    if len(ranges) > limit:
        parts.append(f"... ({len(ranges) - limit} more)")
    return ", ".join(parts)


def _subtract(ranges: List[Range], cut: Range) -> List[Range]:
    out: List[Range] = []
    a2, b2 = cut
    for a, b in ranges:
        if b < a2 or a > b2:
            out.append((a, b))
            continue
        if a < a2:
            out.append((a, a2 - 1))
        if b > b2:
            out.append((b2 + 1, b))
    return out


def parse_time(text: str, now: Optional[float] = None) -> int:
    """``text`` as microseconds since the epoch: RFC 3339, epoch seconds, ``now`` or ``-<n><s|m|h|d|w>``."""
    current = time.time() if now is None else now
    value = text.strip()
    if value.lower() == "now":
        return int(current * 1_000_000)
    match = _RELATIVE_RE.match(value)
    if match:
        return int((current - float(match[1]) * _UNITS[match[2]]) * 1_000_000)
    if _EPOCH_RE.match(value):
        return int(float(value) * 1_000_000)
    iso = value[:-1] + "+00:00" if value[-1:] in ("Z", "z") else value
    try:
        parsed = datetime.fromisoformat(iso)
    except ValueError:
        raise VerifyError(
            f"cannot read the time {text!r}: use RFC 3339 (2026-08-01T12:00:00Z), epoch seconds, now or -1h"
        ) from None
    if parsed.tzinfo is None:
        raise VerifyError(f"the time {text!r} has no UTC offset: add Z or +HH:MM")
    return int(parsed.timestamp() * 1_000_000)


# ----------------------------------------------------------------------------------------------- reports


@dataclass
class ChainReport:
    """What :func:`verify_records` found in one chain."""

    chain_id: str
    status: str = "verified"  # "verified" | "tampered" | "unverifiable"
    records: int = 0  # distinct sequence numbers present
    checkpoints: int = 0
    first_seq: Optional[int] = None
    last_seq: Optional[int] = None
    first_time: Optional[int] = None
    last_time: Optional[int] = None
    verified: List[Range] = field(default_factory=list)
    modified: List[Dict[str, Any]] = field(default_factory=list)
    missing: List[Dict[str, Any]] = field(default_factory=list)
    declared_lost: List[Range] = field(default_factory=list)
    outside_input: List[Range] = field(default_factory=list)
    broken_links: List[int] = field(default_factory=list)
    conflicts: List[int] = field(default_factory=list)
    after_close: List[int] = field(default_factory=list)
    closed_at: Optional[int] = None
    last_checkpoint: Optional[int] = None
    uncovered: Optional[Range] = None
    checkpoint_gaps: List[Dict[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    out_of_order: int = 0
    dropped: int = 0
    unsigned_fields: Dict[str, int] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready view."""
        return {
            "chain_id": self.chain_id,
            "status": self.status,
            "records": self.records,
            "checkpoints": self.checkpoints,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "first_time": _iso(self.first_time) if self.first_time is not None else None,
            "last_time": _iso(self.last_time) if self.last_time is not None else None,
            "verified": [list(r) for r in self.verified],
            "modified": self.modified,
            "missing": self.missing,
            "declared_lost": [list(r) for r in self.declared_lost],
            "outside_input": [list(r) for r in self.outside_input],
            "broken_links": self.broken_links,
            "conflicts": self.conflicts,
            "after_close": self.after_close,
            "closed": self.closed_at is not None,
            "closed_at": self.closed_at,
            "last_checkpoint": self.last_checkpoint,
            "uncovered": list(self.uncovered) if self.uncovered else None,
            "checkpoint_gaps": self.checkpoint_gaps,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "dropped": self.dropped,
            "unsigned_fields": self.unsigned_fields,
            "problems": self.problems,
            "warnings": self.warnings,
            "notes": self.notes,
        }


@dataclass
class Report:
    """The outcome of one verification; :attr:`exit_status` is the command's exit status."""

    source: str = ""
    records: int = 0
    chains: List[ChainReport] = field(default_factory=list)
    unchained: int = 0
    unchained_samples: List[str] = field(default_factory=list)
    errors: List[str] = field(default_factory=list)
    problems: List[str] = field(default_factory=list)
    warnings: List[str] = field(default_factory=list)
    max_checkpoint_gap: Optional[float] = None
    window: Optional[Range] = None

    @property
    def exit_status(self) -> int:
        """0 verified, 1 tampering found, 2 could not check."""
        if self.errors:
            return EXIT_ERROR
        if self.problems or any(c.status != "verified" for c in self.chains):
            return EXIT_TAMPERED
        return EXIT_OK

    @property
    def result(self) -> str:
        """``verified``, ``tampered`` or ``error``."""
        return {EXIT_OK: "verified", EXIT_TAMPERED: "tampered"}.get(self.exit_status, "error")

    def to_dict(self) -> Dict[str, Any]:
        """A JSON-ready view."""
        return {
            "result": self.result,
            "exit_status": self.exit_status,
            "source": self.source,
            "records": self.records,
            "window": (
                {"start": _iso(self.window[0]), "end": _iso(self.window[1])} if self.window is not None else None
            ),
            "max_checkpoint_gap_s": self.max_checkpoint_gap,
            "chains": [c.to_dict() for c in self.chains],
            "unchained": {"count": self.unchained, "samples": self.unchained_samples},
            "errors": self.errors,
            "problems": self.problems,
            "warnings": self.warnings,
        }

    def render_text(self) -> str:
        """The human-readable report."""
        lines: List[str] = []
        checkpoints = sum(c.checkpoints for c in self.chains)
        lines.append(
            f"o2audit verify: {self.records} records from {self.source or 'input'}: {len(self.chains)} chain(s), "
            f"{checkpoints} checkpoint(s), {self.unchained} record(s) without a chain"
        )
        if self.window is not None:
            lines.append(f"time range: {_iso(self.window[0])} .. {_iso(self.window[1])}")
        for message in self.errors:
            lines.append(f"ERROR: {message}")
        for chain in [] if self.errors else self.chains:
            span = f"seq {chain.first_seq}-{chain.last_seq}" if chain.first_seq is not None else "no usable seq"
            state = {"verified": "VERIFIED", "tampered": "TAMPERED", "unverifiable": "NOT VERIFIABLE"}[chain.status]
            end = f", closed at seq {chain.closed_at}" if chain.closed_at is not None else ", not closed"
            lines.append(
                f"chain {_safe(chain.chain_id)}: {state}: {span}, {chain.records} record(s), "
                f"{chain.checkpoints} checkpoint(s){end}"
            )
            verified = _range_text(chain.verified) or "-"
            lines.append(f"  {_iso(chain.first_time)} .. {_iso(chain.last_time)}; verified seq {verified}")
            for message in chain.problems:
                lines.append(f"  TAMPERED: {message}")
            for message in chain.warnings:
                lines.append(f"  WARNING: {message}")
            for message in chain.notes:
                lines.append(f"  note: {message}")
        if self.unchained:
            sample = ", ".join(self.unchained_samples)
            lines.append(f"records without a chain: {self.unchained} ({sample})")
        for message in self.problems:
            lines.append(f"TAMPERED: {message}")
        for message in self.warnings:
            lines.append(f"WARNING: {message}")
        verdict = {
            EXIT_OK: "all chains verified" + (" (with warnings)" if self._has_warnings() else ""),
            EXIT_TAMPERED: "TAMPERING FOUND",
            EXIT_ERROR: "COULD NOT CHECK",
        }[self.exit_status]
        lines.append(f"result: {verdict} (exit {self.exit_status})")
        return "\n".join(lines) + "\n"

    def _has_warnings(self) -> bool:
        return bool(self.warnings) or any(c.warnings for c in self.chains)


# ----------------------------------------------------------------------------------------------- verification


@dataclass
class _Copy:
    index: int
    record: Mapping[str, Any]
    seq: Optional[int]
    valid: bool


def _event(record: Mapping[str, Any]) -> Any:
    return record.get("event_id")


def _ts(record: Mapping[str, Any]) -> Optional[int]:
    return _as_int(record.get("_timestamp"))


def _modified_reason(record: Mapping[str, Any]) -> str:
    fields = covered_fields(record)
    if fields is None:
        return "chain_fields missing or malformed"
    if not isinstance(record.get("chain_mac"), str):
        return "chain_mac missing"
    absent = [f for f in fields if record.get(f) is None]
    if absent:
        return f"MAC mismatch (covered fields absent: {', '.join(absent[:5])})"
    return "MAC mismatch"


def verify_records(
    records: Iterable[Mapping[str, Any]],
    key: bytes,
    *,
    window: Optional[Range] = None,
    max_checkpoint_gap: Optional[float] = None,
    partial: bool = False,
    require_chain: bool = False,
    source: str = "",
) -> Report:
    """Verify ``records`` (any order, duplicates allowed) with ``key``; see the module docstring.

    ``window`` (start, end) in µs: the records were read for that time range, so chains may begin or end
    outside it. ``partial``: the input may begin in the middle of a chain (rotated files).
    ``max_checkpoint_gap``: seconds allowed between checkpoints (default: twice the interval the
    checkpoints state, else 1200).
    """
    report = Report(source=source, window=window)
    by_chain: Dict[str, List[_Copy]] = {}
    for index, record in enumerate(records):
        report.records += 1
        chain_id = record.get("chain_id")
        if not isinstance(chain_id, str) or not chain_id:
            report.unchained += 1
            if len(report.unchained_samples) < 10:
                label = record.get("event_id") or _iso(_ts(record))
                report.unchained_samples.append(_safe(label, 80))
            continue
        seq = _as_seq(record.get("chain_seq"))
        valid = seq is not None and verify_mac(key, record)
        by_chain.setdefault(chain_id, []).append(_Copy(index, record, seq, valid))

    if report.records == 0:
        report.errors.append("no records to check")
        return report
    if not by_chain:
        report.errors.append(
            "no record carries a chain: was O2_AUDIT_HMAC_KEY set in the application for this time range?"
        )
        return report
    if not any(c.valid for copies in by_chain.values() for c in copies):
        report.errors.append(
            "the key does not match any record: wrong key (check --key-file / O2_AUDIT_HMAC_KEY), "
            "or every record was altered"
        )

    # Declarations and intervals stated by authentic checkpoints of any chain (all share the key).
    declared: Dict[str, Set[Tuple[int, int, int]]] = {}
    interval = 0.0
    for copies in by_chain.values():
        for copy in copies:
            if copy.valid and copy.record.get("record_type") == CHECKPOINT:
                for chain_id, first, last, count in parse_lost(copy.record.get("checkpoint_lost")):
                    declared.setdefault(chain_id, set()).add((first, last, count))
                interval = max(interval, _as_float(copy.record.get("checkpoint_interval_s")) or 0.0)
    if max_checkpoint_gap is not None:
        gap = max_checkpoint_gap
    else:
        gap = 2 * interval if interval > 0 else DEFAULT_MAX_CHECKPOINT_GAP
    report.max_checkpoint_gap = gap

    for chain_id in sorted(by_chain, key=lambda c: min(_ts(x.record) or 0 for x in by_chain[c])):
        report.chains.append(
            _verify_chain(chain_id, by_chain[chain_id], declared.get(chain_id, set()), window, gap, partial)
        )
    if report.unchained:
        message = (
            f"{report.unchained} record(s) carry no chain: they are not protected (a process without the key, "
            "OpenObserve's own events, or inserted records)"
        )
        (report.problems if require_chain else report.warnings).append(message)
    return report


def _verify_chain(
    chain_id: str,
    copies: List[_Copy],
    declared: Set[Tuple[int, int, int]],
    window: Optional[Range],
    max_gap: float,
    partial: bool,
) -> ChainReport:
    out = ChainReport(chain_id=chain_id)

    # Physical order: how many records come after a later one of the same chain (information only).
    highest = 0
    for copy in sorted(copies, key=lambda c: c.index):
        if copy.seq is None:
            continue
        if copy.seq < highest:
            out.out_of_order += 1
        highest = max(highest, copy.seq)

    # One representative per seq; every copy that fails its MAC is a modification.
    reps: Dict[int, Mapping[str, Any]] = {}
    valid: Dict[int, Mapping[str, Any]] = {}
    macs: Dict[int, Set[str]] = {}
    for copy in copies:
        if not copy.valid:
            if copy.seq is None:
                reason = "chain_seq missing or not a positive integer"
            else:
                reason = _modified_reason(copy.record)
            out.modified.append({"seq": copy.seq, "event_id": _event(copy.record), "reason": reason})
            if copy.seq is not None:
                reps.setdefault(copy.seq, copy.record)
            continue
        assert copy.seq is not None
        mac = str(copy.record["chain_mac"])
        seen = macs.setdefault(copy.seq, set())
        if mac in seen:
            out.duplicates += 1
            continue
        seen.add(mac)
        if copy.seq in valid:
            out.conflicts.append(copy.seq)
            continue
        valid[copy.seq] = copy.record
        reps[copy.seq] = copy.record
    out.modified.sort(key=lambda m: (m["seq"] is None, m["seq"] or 0))
    out.conflicts = sorted(set(out.conflicts))

    present = sorted(reps)
    out.records = len(present)
    if not valid:
        out.status = "unverifiable"
        out.problems.append(
            f"no record of this chain verifies with the key ({len(copies)} record(s)): forged records, "
            "or a chain signed with another key"
        )
        if present:
            out.first_seq, out.last_seq = present[0], present[-1]
        return out
    out.first_seq, out.last_seq = present[0], present[-1]
    times = [t for t in (_ts(r) for r in valid.values()) if t is not None]
    out.first_time, out.last_time = (min(times), max(times)) if times else (None, None)

    # Links and verified ranges.
    valid_seqs = sorted(valid)
    run_start: Optional[int] = None
    previous: Optional[int] = None
    for seq in valid_seqs:
        record = valid[seq]
        linked = True
        if seq == 1:
            linked = (record.get("chain_prev") or "") == ""
        elif seq - 1 in valid:
            linked = record.get("chain_prev") == valid[seq - 1].get("chain_mac")
        if not linked:
            out.broken_links.append(seq)
        if run_start is None or previous != seq - 1 or not linked:
            if run_start is not None and previous is not None:
                out.verified.append((run_start, previous))
            run_start = seq
        previous = seq
    if run_start is not None and previous is not None:
        out.verified.append((run_start, previous))

    # Checkpoints.
    checkpoints = {s: r for s, r in valid.items() if r.get("record_type") == CHECKPOINT}
    out.checkpoints = len(checkpoints)
    closing = sorted(s for s, r in checkpoints.items() if r.get("checkpoint_closing") is True)
    out.closed_at = closing[0] if closing else None
    out.last_checkpoint = max(checkpoints) if checkpoints else None
    out.dropped = max((_as_int(r.get("checkpoint_dropped")) or 0 for r in checkpoints.values()), default=0)
    checkpoint_refs = {_as_int(r.get("checkpoint_prev_seq")) for r in checkpoints.values()}
    request_refs = {_as_int(r.get("chain_last_seq")) for r in checkpoints.values()}
    if out.closed_at is not None:
        out.after_close = [s for s in present if s > out.closed_at]

    # Gaps: missing (tampering), declared lost, or outside the input.
    gaps: List[Tuple[Range, bool]] = []  # (range, judged) - not judged: may lie outside the input
    if present[0] > 1:
        gaps.append(((1, present[0] - 1), not (partial or window is not None)))
    for low, high in zip(present, present[1:]):
        if high > low + 1:
            judged = True
            if window is not None:
                low_ts, high_ts = _ts(reps[low]), _ts(reps[high])
                before = low_ts is not None and low_ts < window[0]
                after = high_ts is not None and high_ts >= window[1]
                judged = not (before or after)
            gaps.append(((low + 1, high - 1), judged))
    missing: List[Range] = []
    for gap, judged in gaps:
        if judged:
            missing.append(gap)
        else:
            out.outside_input.append(gap)
    excused: List[Range] = []
    for first, last, count in sorted(declared):
        inside = bisect.bisect_right(present, last) - bisect.bisect_left(present, first)
        absent = (last - first + 1) - inside
        if absent <= count:
            excused.append((first, last))
    for cut in excused:
        out.declared_lost.extend(_intersect(missing, cut))
        missing = _subtract(missing, cut)
    out.declared_lost = _ranges_merge(out.declared_lost)
    for first, last in missing:
        named = sorted(s for s in checkpoint_refs if s is not None and first <= s <= last)
        requests = sorted(s for s in request_refs if s is not None and first <= s <= last)
        entry: Dict[str, Any] = {"first": first, "last": last, "count": last - first + 1}
        if named:
            entry["checkpoints"] = named[:_MAX_LISTED]
        if requests:
            entry["requests"] = requests[:_MAX_LISTED]
        out.missing.append(entry)

    # Tail: a chain without a closing checkpoint crashed, is still running, or was cut after its last checkpoint.
    if out.closed_at is None:
        covered_to = out.last_checkpoint or 0
        if present[-1] > covered_to:
            out.uncovered = (covered_to + 1, present[-1])

    # Stretches without a checkpoint (no seq missing there: the process stalled, slept, or its clock jumped).
    points: List[Tuple[int, int]] = []
    first_valid = valid_seqs[0]
    for seq in sorted({first_valid, *checkpoints} | ({valid_seqs[-1]} if out.closed_at is None else set())):
        stamp = _ts(valid[seq])
        if stamp is not None:
            points.append((seq, stamp))
    gap_us = max_gap * 1_000_000
    unexplained = [g for g, _ in gaps]
    for (s1, t1), (s2, t2) in zip(points, points[1:]):
        if t2 - t1 > gap_us and not any(s1 < a <= s2 for a, _ in unexplained):
            out.checkpoint_gaps.append({"after_seq": s1, "before_seq": s2, "seconds": round((t2 - t1) / 1e6, 3)})

    _collect_unsigned(out, valid.values())
    _describe(out, window, max_gap)
    return out


def _intersect(ranges: List[Range], cut: Range) -> List[Range]:
    return [(max(a, cut[0]), min(b, cut[1])) for a, b in ranges if not (b < cut[0] or a > cut[1])]


def _ranges_merge(ranges: List[Range]) -> List[Range]:
    out: List[Range] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _describe(out: ChainReport, window: Optional[Range], max_gap: float) -> None:
    for item in out.modified[:_MAX_LISTED]:
        out.problems.append(
            f"modified record: seq {item['seq']} event_id={_safe(item['event_id'])}: {_safe(item['reason'], 200)}"
        )
    if len(out.modified) > _MAX_LISTED:
        out.problems.append(f"... {len(out.modified) - _MAX_LISTED} more modified record(s)")
    for item in out.missing[:_MAX_LISTED]:
        span = str(item["first"]) if item["first"] == item["last"] else f"{item['first']}-{item['last']}"
        detail = ""
        if item.get("checkpoints"):
            detail = f", including checkpoint(s) seq {', '.join(map(str, item['checkpoints']))}"
        out.problems.append(f"missing seq {span} ({item['count']} record(s) deleted{detail})")
    if len(out.missing) > _MAX_LISTED:
        out.problems.append(f"... {len(out.missing) - _MAX_LISTED} more gap(s)")
    if out.broken_links:
        out.problems.append(
            "broken link (chain_prev differs from the previous record's MAC) at seq "
            + _range_text(_ranges(out.broken_links))
        )
    if out.conflicts:
        out.problems.append(
            f"different authentic records share seq {_range_text(_ranges(out.conflicts))} "
            "(the chain id was reused, e.g. by a forked process, or the key leaked)"
        )
    if out.after_close:
        out.problems.append(
            f"records after the closing checkpoint (seq {out.closed_at}): seq {_range_text(_ranges(out.after_close))}"
        )
    if out.declared_lost:
        out.warnings.append(
            f"seq {_range_text(out.declared_lost)}: not delivered, as the application declared in its checkpoints "
            "(a delivery loss, not tampering)"
        )
    if out.dropped:
        out.warnings.append(
            f"the application declared {out.dropped} record(s) dropped before sealing (a full queue): "
            "they never entered the chain"
        )
    if out.uncovered is not None:
        first, last = out.uncovered
        last_cp = f"seq {out.last_checkpoint}" if out.last_checkpoint else "none"
        message = (
            f"no closing checkpoint: the chain ends at seq {last} ({_iso(out.last_time)}); last checkpoint: {last_cp}; "
            f"seq {first}-{last} are not covered by a checkpoint. The process crashed, was killed, is still running, "
            "or the chain was cut after its last checkpoint (indistinguishable)"
        )
        if window is not None and out.last_time is not None and out.last_time >= window[1] - max_gap * 1_000_000:
            message += "; it may continue after the time range"
        out.warnings.append(message)
    elif out.closed_at is None and out.last_checkpoint is not None:
        out.warnings.append(
            f"no closing checkpoint: the chain ends with checkpoint seq {out.last_checkpoint} "
            f"({_iso(out.last_time)}); the process crashed, was killed or is still running"
        )
    for item in out.checkpoint_gaps[:_MAX_LISTED]:
        out.warnings.append(
            f"no checkpoint for {item['seconds']:.0f} s between seq {item['after_seq']} and seq {item['before_seq']} "
            f"(at most {max_gap:.0f} s expected; no record is missing there: the process stalled or its clock jumped)"
        )
    if out.unsigned_fields:
        names = ", ".join(f"{_safe(k, 60)} ({v})" for k, v in sorted(out.unsigned_fields.items())[:_MAX_LISTED])
        out.warnings.append(f"fields not covered by the MAC (added after sealing, not trusted): {names}")
    if out.outside_input:
        out.notes.append(f"seq {_range_text(out.outside_input)} may lie outside the input (time range or --partial)")
    if out.duplicates:
        out.notes.append(f"{out.duplicates} identical re-delivered copie(s) ignored")
    if out.out_of_order:
        out.notes.append(
            f"{out.out_of_order} record(s) out of sequence order in the input (order restored from chain_seq)"
        )
    if out.problems:
        out.status = "tampered"


def _collect_unsigned(out: ChainReport, records: Iterable[Mapping[str, Any]]) -> None:
    for record in records:
        fields = covered_fields(record)
        if fields is None:
            continue
        covered = set(fields)
        covered.add("chain_mac")
        for name, value in record.items():
            if name not in covered and value is not None and value != "":
                out.unsigned_fields[name] = out.unsigned_fields.get(name, 0) + 1


# ----------------------------------------------------------------------------------------------- input


def read_jsonl(paths: Sequence[str], stdin: Optional[IO[bytes]] = None) -> Tuple[List[Dict[str, Any]], List[str]]:
    """Records of the JSON-lines files ``paths`` (``-``: stdin) and warnings for unreadable lines.

    Raises :class:`VerifyError` when a file cannot be opened or read.
    """
    records: List[Dict[str, Any]] = []
    warnings: List[str] = []
    for path in paths:
        try:
            if path == "-":
                stream = stdin if stdin is not None else sys.stdin.buffer
                data = stream.read()
            else:
                with open(path, "rb") as handle:
                    data = handle.read()
        except OSError as exc:
            raise VerifyError(f"cannot read {path}: {exc.strerror or type(exc).__name__}") from None
        name = "stdin" if path == "-" else path
        bad: List[int] = []
        for number, line in enumerate(data.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                value = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                bad.append(number)
                continue
            if isinstance(value, dict):
                records.append(value)
            else:
                bad.append(number)
        if bad:
            shown = ", ".join(map(str, bad[:_MAX_LISTED])) + (" ..." if len(bad) > _MAX_LISTED else "")
            warnings.append(f"{name}: {len(bad)} line(s) are not JSON objects and were skipped (line {shown})")
    return records, warnings


def fetch_openobserve(
    config: O2AuditConfig, start_us: int, end_us: int, *, page_size: int = DEFAULT_PAGE_SIZE
) -> List[Dict[str, Any]]:
    """Every record of ``config.stream`` with ``start_us <= _timestamp < end_us``, via ``_search``, paged.

    Raises :class:`VerifyError` on any HTTP or transport error (the message never holds the password).
    """
    import requests

    if not config.endpoint or config.file_path() is not None:
        raise VerifyError("O2_AUDIT_ENDPOINT must be the http(s) URL of OpenObserve (for a file: o2audit verify FILE)")
    if config.user is None or config.password is None:
        raise VerifyError("O2_AUDIT_USER and O2_AUDIT_PASSWORD (or O2_AUDIT_PASSWORD_FILE) must be set")
    url = f"{config.endpoint}/api/{quote(config.org, safe='')}/_search?type=logs"
    # The stream name is validated by the configuration: letters, digits, '_', '-', ':' and '.' only.
    sql = f'SELECT * FROM "{config.stream}" ORDER BY _timestamp ASC'  # noqa: S608
    auth = (config.user, config.password.reveal())
    verify: Any = config.ca_bundle or True
    cert = (config.client_cert, config.client_key) if config.client_cert and config.client_key else None
    records: List[Dict[str, Any]] = []
    offset = 0
    with requests.Session() as session:
        while True:
            query = {"sql": sql, "start_time": start_us, "end_time": end_us, "from": offset, "size": page_size}
            body = {"query": query}
            try:
                response = session.post(
                    url, json=body, auth=auth, timeout=config.timeout, verify=verify, cert=cert, allow_redirects=False
                )
            except requests.RequestException as exc:
                raise VerifyError(f"cannot reach {url}: {type(exc).__name__}: {_short(str(exc))}") from None
            if response.status_code != 200:
                raise VerifyError(f"{url} answered HTTP {response.status_code}: {_short(response.text)}")
            try:
                hits = response.json()["hits"]
                if not isinstance(hits, list):
                    raise TypeError("hits is not a list")
            except (ValueError, KeyError, TypeError) as exc:
                raise VerifyError(f"{url} answered an unreadable search result: {exc}") from None
            records.extend(h for h in hits if isinstance(h, dict))
            if len(hits) < page_size:
                return records
            offset += len(hits)


def _short(text: str) -> str:
    return " ".join(text.split())[:300]


def _read_key_file(path: str) -> bytes:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as exc:
        raise VerifyError(f"cannot read the key file {path}: {exc.strerror or type(exc).__name__}") from None
    data = data[:-2] if data.endswith(b"\r\n") else data[:-1] if data.endswith(b"\n") else data
    if len(data) < MIN_KEY_BYTES:
        raise VerifyError(f"the key in {path} is shorter than {MIN_KEY_BYTES} bytes")
    return data


def _load_key(key_file: Optional[str], environ: Mapping[str, str]) -> bytes:
    if key_file:
        return _read_key_file(key_file)
    env = {k: environ[k] for k in _ENV_FOR_KEY if k in environ}
    try:
        config = O2AuditConfig.from_env(env, require_endpoint=False)
    except ConfigError as exc:
        raise VerifyError(str(exc)) from None
    if config.hmac_key is None:
        raise VerifyError("no key: set O2_AUDIT_HMAC_KEY or O2_AUDIT_HMAC_KEY_FILE, or give --key-file")
    return config.hmac_key.reveal().encode("utf-8")


def _openobserve_config(args: argparse.Namespace, environ: Mapping[str, str]) -> O2AuditConfig:
    env = {k: environ[k] for k in _ENV_FOR_OPENOBSERVE if k in environ}
    overrides = {"endpoint": args.endpoint, "org": args.org, "stream": args.stream, "user": args.user}
    try:
        return O2AuditConfig.from_env(env, require_endpoint=True, **overrides)
    except ConfigError as exc:
        raise VerifyError(str(exc)) from None


# ----------------------------------------------------------------------------------------------- command


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="o2audit verify",
        description="Check the tamper-evidence chains of an otel-o2audit trail. "
        "Exit status: 0 verified, 1 tampering found, 2 could not check.",
    )
    parser.add_argument("files", nargs="*", metavar="FILE", help="JSON-lines files ('-' for stdin)")
    parser.add_argument("--from-openobserve", action="store_true", help="read the records with OpenObserve's _search")
    parser.add_argument("--start", help="range start: RFC 3339, epoch seconds, now, or relative like -1h")
    parser.add_argument("--end", default="now", help="range end (default: now)")
    parser.add_argument("--endpoint", help="OpenObserve URL (default: O2_AUDIT_ENDPOINT)")
    parser.add_argument("--org", help="organization (default: O2_AUDIT_ORG or _meta)")
    parser.add_argument("--stream", help="stream (default: O2_AUDIT_STREAM or audit)")
    parser.add_argument("--user", help="user (default: O2_AUDIT_USER); the password comes only from the environment")
    parser.add_argument(
        "--margin",
        type=float,
        default=DEFAULT_MARGIN,
        help=f"seconds read before and after the range to judge gaps at its ends (default {DEFAULT_MARGIN:.0f})",
    )
    parser.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help=argparse.SUPPRESS)
    parser.add_argument("--key-file", help="file holding the HMAC key (default: O2_AUDIT_HMAC_KEY[_FILE])")
    parser.add_argument(
        "--max-checkpoint-gap",
        type=float,
        help="seconds allowed between checkpoints (default: twice their stated interval, else 1200)",
    )
    parser.add_argument("--partial", action="store_true", help="the input may begin in the middle of a chain")
    parser.add_argument("--require-chain", action="store_true", help="records without a chain are a failure")
    parser.add_argument("--json", action="store_true", help="print a machine-readable JSON report")
    return parser


def _run(args: argparse.Namespace, environ: Mapping[str, str]) -> Report:
    if args.from_openobserve == bool(args.files):
        raise VerifyError("give FILE(s) or --from-openobserve (one of them)")
    if args.files and args.start:
        raise VerifyError("--start and --end select what --from-openobserve reads; a file is verified whole")
    for name in ("margin", "max_checkpoint_gap"):
        value = getattr(args, name)
        if value is not None and (not math.isfinite(value) or value < 0):
            raise VerifyError(f"--{name.replace('_', '-')} must be zero or a positive number of seconds")
    if args.page_size < 1:
        raise VerifyError("--page-size must be at least 1")
    key = _load_key(args.key_file, environ)
    window: Optional[Range] = None
    if args.from_openobserve:
        if not args.start:
            raise VerifyError("--from-openobserve needs --start (e.g. --start -24h)")
        now = time.time()
        start, end = parse_time(args.start, now), parse_time(args.end, now)
        if end <= start:
            raise VerifyError("--end must be after --start")
        config = _openobserve_config(args, environ)
        margin = int(args.margin * 1_000_000)
        records = fetch_openobserve(config, start - margin, end + margin, page_size=args.page_size)
        source = f"{config.endpoint} {config.org}/{config.stream}"
        window = (start, end)
        read_warnings: List[str] = []
    else:
        records, read_warnings = read_jsonl(args.files)
        source = ", ".join("stdin" if p == "-" else p for p in args.files)
    report = verify_records(
        records,
        key,
        window=window,
        max_checkpoint_gap=args.max_checkpoint_gap,
        partial=args.partial,
        require_chain=args.require_chain,
        source=source,
    )
    report.warnings[:0] = read_warnings
    return report


def _join_time_values(argv: List[str]) -> List[str]:
    # "--start -1h": argparse would take "-1h" for an option; pass it as "--start=-1h".
    out: List[str] = []
    args = iter(argv)
    for arg in args:
        if arg in ("--start", "--end"):
            value = next(args, None)
            out.append(arg if value is None else f"{arg}={value}")
        else:
            out.append(arg)
    return out


def main(argv: Optional[Sequence[str]] = None, environ: Optional[Mapping[str, str]] = None) -> int:
    """``o2audit verify``: print the report; return 0 verified, 1 tampering found, 2 could not check."""
    parser = _parser()
    try:
        args = parser.parse_args(_join_time_values(list(sys.argv[1:] if argv is None else argv)))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else EXIT_ERROR
    env = os.environ if environ is None else environ
    try:
        report = _run(args, env)
    except VerifyError as exc:
        report = Report(errors=[str(exc)])
    if args.json:
        sys.stdout.write(json.dumps(report.to_dict(), indent=2, sort_keys=False) + "\n")
    elif report.chains or report.records:
        sys.stdout.write(report.render_text())
    else:
        for message in report.errors:
            sys.stderr.write(f"o2audit verify: error: {message}\n")
    return report.exit_status
