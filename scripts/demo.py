"""End-to-end demo: the example app under ``opentelemetry-instrument``, realistic traffic, its audit trail.

Run from the repository root as ``make demo`` (``.venv/bin/python scripts/demo.py``). Records go to
``demo-output/audit.jsonl``, or to ``$O2_AUDIT_ENDPOINT`` (an OpenObserve URL with ``O2_AUDIT_USER`` and
``O2_AUDIT_PASSWORD``, or another ``file://`` URL) when that is set. The app's output is in
``demo-output/app.log``. Exits non-zero when the audit trail does not hold exactly the expected records.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, Optional, Tuple
from urllib.parse import unquote, urlparse

import requests

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "demo-output"
LOG = OUT / "app.log"
BIN = Path(sys.executable).parent  # the venv's bin/ (not resolved: python may be a symlink)
NOT_AUDITED = ("ingestion", "probe")
Auth = Optional[Tuple[str, str]]
ADMIN, ALICE, BOB = (("admin@example.com", "admin-pass"), ("alice@example.com", "alice-pass"),
                     ("bob@example.com", "bob-pass"))
Key = Tuple[str, str, int]  # (method, path, status): what a request and its record have in common


def fail(message: str, proc: Optional[subprocess.Popen[bytes]] = None) -> NoReturn:
    """Stop the app if it runs, print the message and the tail of app.log, exit 1."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    tail = LOG.read_text(errors="replace").splitlines()[-25:] if LOG.exists() else []
    print(f"\nDEMO FAILED: {message}\n--- last lines of {LOG} ---\n" + "\n".join(tail), file=sys.stderr)
    sys.exit(1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def sink() -> Tuple[str, Optional[Path], int]:
    """The audit endpoint, its JSON-lines file (None for http) and the file offset where this run starts."""
    endpoint = os.environ.get("O2_AUDIT_ENDPOINT", "")
    if not endpoint:
        path = OUT / "audit.jsonl"
        path.unlink(missing_ok=True)
        return path.as_uri(), path, 0
    if endpoint.startswith("file:"):
        path = Path(unquote(urlparse(endpoint).path))
        return endpoint, path, path.stat().st_size if path.exists() else 0
    return endpoint, None, 0


def start_app(port: int, endpoint: str) -> subprocess.Popen[bytes]:
    """Start uvicorn under opentelemetry-instrument with the audit processor switched on."""
    env = dict(os.environ, O2_AUDIT_ENABLED="true", O2_AUDIT_ENDPOINT=endpoint, O2_AUDIT_BATCH_SIZE="25",
               O2_AUDIT_PUBLISH_INTERVAL="2", O2_AUDIT_CAPTURE_BODY="true",
               OTEL_SERVICE_NAME="dashboards-api", OTEL_TRACES_EXPORTER="none",
               OTEL_METRICS_EXPORTER="none", OTEL_LOGS_EXPORTER="none")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env["PATH"] = os.pathsep.join((str(BIN), os.environ.get("PATH", "")))
    cmd = [str(BIN / "opentelemetry-instrument"), "uvicorn", "examples.fastapi_app.app:app",
           "--host", "127.0.0.1", "--port", str(port)]
    with LOG.open("wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def wait_healthy(http: requests.Session, base: str, proc: subprocess.Popen[bytes], seconds: float = 20.0) -> None:
    """Poll /healthz until it answers 200; fail if the app exits or the deadline passes."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            fail(f"the app exited with code {proc.returncode} during start-up")
        try:
            if http.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    fail(f"the app did not answer {base}/healthz within {seconds:.0f} s", proc)


class Driver:
    """Sends requests; counts them per category and remembers which ones the audit trail must hold."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = requests.Session()
        self.http.trust_env = False  # no proxies, no ~/.netrc credentials on "anonymous" calls
        self.http.headers["User-Agent"] = "o2audit-demo/1.0"
        self.sent: Counter[str] = Counter()
        self.expected: Counter[Key] = Counter()
        self.last = ""

    def __call__(self, category: str, method: str, path: str, expect: int, auth: Auth = None,
                 **kw: Any) -> Any:
        """Send one request, warn when its status is not ``expect``, return its JSON body (or None)."""
        self.last = f"{method} {path}"
        resp = self.http.request(method, self.base + path, auth=auth, timeout=10, **kw)
        self.sent[category] += 1
        if category not in NOT_AUDITED:
            self.expected[(method, path.split("?")[0], resp.status_code)] += 1
        if resp.status_code != expect:
            print(f"  warning: {method} {path} answered {resp.status_code}, expected {expect}")
        return resp.json() if resp.headers.get("content-type", "").startswith("application/json") else None


def drive(d: Driver) -> None:
    """About 45 requests: logins, dashboard CRUD in two orgs, failures, ingestion and probes."""
    logins = ((*ALICE, 200), (*BOB, 200), (ALICE[0], "guess", 401), ("eve@evil.test", "x", 401))
    for email, password, code in logins:
        d("auth", "POST", "/auth/login", code, json={"email": email, "password": password})
    ids: dict[str, list[str]] = {}
    for org, user, secret in (("acme", ALICE, "api_key=sk-live-4f9a1c"), ("globex", BOB, "token=tok-93be7")):
        d("dashboards", "GET", f"/api/{org}/dashboards?{secret}&page=2", 200, user)
        ids[org] = [d("dashboards", "POST", f"/api/{org}/dashboards", 201, user,
                      json={"title": title, "panels": [{"type": "line", "query": f"SELECT * FROM {title}"}]})
                    ["dashboard_id"] for title in ("latency", "errors", "throughput")]
        first, second = ids[org][:2]
        d("dashboards", "GET", f"/api/{org}/dashboards/{first}", 200, user)
        d("dashboards", "PUT", f"/api/{org}/dashboards/{first}", 200, user, json={"title": "p99 latency"})
        d("dashboards", "DELETE", f"/api/{org}/dashboards/{second}", 204, user)
        d("dashboards", "GET", f"/api/{org}/dashboards/{second}", 404, user)
        d("dashboards", "GET", f"/api/{org}/dashboards?sort=title&{secret}", 200, user)
    d("dashboards", "GET", "/api/globex/dashboards?page=1", 200, ADMIN)
    d("dashboards", "DELETE", f"/api/globex/dashboards/{ids['globex'][2]}", 204, ADMIN)
    d("anonymous", "GET", "/api/acme/dashboards", 401)
    d("anonymous", "POST", "/api/acme/dashboards", 401, json={"title": "sneaky"})
    d("anonymous", "GET", "/api/acme/dashboards", 401, (ALICE[0], "wrong-password"))
    d("forbidden", "DELETE", "/api/acme/settings", 403, ALICE)
    d("forbidden", "GET", "/api/acme/dashboards", 403, BOB)
    d("admin", "DELETE", "/api/globex/settings", 204, ADMIN)
    d("not-found", "GET", "/api/acme/no-such-page", 404, ALICE)
    # uvicorn closes the connection after an unhandled exception: don't let the session reuse it
    d("broken", "GET", "/api/acme/reports/broken", 500, ALICE, headers={"Connection": "close"})
    for org, user in (("acme", ALICE), ("globex", BOB)):
        logs = [{"level": "info", "msg": "checkout ok"}] * 3
        d("ingestion", "POST", f"/api/{org}/app_logs/_json", 200, user, json=logs)
        bulk = '{"index": {"_index": "web"}}\n{"status": 200}\n' * 2
        d("ingestion", "POST", f"/api/{org}/_bulk", 200, user, data=bulk)
        d("ingestion", "POST", f"/api/{org}/v1/logs", 200, user,
          json={"resourceLogs": [{"scopeLogs": [{"logRecords": [{"body": {"stringValue": "x"}}]}]}]})
        d("ingestion", "POST", "/v1/traces", 200, user, headers={"organization": org},
          json={"resourceSpans": [{"scopeSpans": [{"spans": [{"name": "checkout"}]}]}]})
    for path in ("/healthz", "/metrics", "/healthz", "/metrics"):
        d("probe", "GET", path, 200)


def stop_app(proc: subprocess.Popen[bytes], seconds: float = 60.0) -> None:
    """SIGTERM (the library publishes pending records on it) and wait for the exit."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        fail(f"the app did not exit within {seconds:.0f} s of SIGTERM", proc)
    if time.monotonic() - started > 5:
        print(f"  the app took {time.monotonic() - started:.1f} s to exit (publishing pending records)")
    if code not in (0, -signal.SIGTERM):  # uvicorn re-raises SIGTERM once it has shut down gracefully
        print(f"  warning: the app exited with code {code} (see {LOG})")


def cut(text: str, width: int) -> str:
    """``text`` shortened to ``width`` characters, marking the cut."""
    return text if len(text) <= width else text[: width - 2] + ".."


def print_table(records: list[dict[str, Any]]) -> None:
    """One fixed-width line per record."""
    print(f"{'time':<12} {'user':<18} {'org':<7} {'method':<6} {'path':<50} {'status':>6} {'ms':>7}  error")
    for r in sorted(records, key=lambda r: r.get("_timestamp", 0)):
        when = datetime.fromtimestamp(r.get("_timestamp", 0) / 1e6).strftime("%H:%M:%S.%f")[:-3]
        path = r.get("http_path", "") + (f"?{r['http_query_params']}" if r.get("http_query_params") else "")
        print(f"{when:<12} {cut(r.get('user_email') or '-', 18):<18} {cut(r.get('org_id') or '-', 7):<7} "
              f"{r.get('http_method', ''):<6} {cut(path, 50):<50} {r.get('http_response_code', ''):>6} "
              f"{float(r.get('duration_ms') or 0):>7.1f}  {cut(r.get('error_msg', ''), 40)}")


def show_login(records: list[dict[str, Any]]) -> None:
    """Show what the trail keeps of a login: who tried, from where, and the body with its secret redacted."""
    for record in records:
        if record.get("http_path") == "/auth/login" and record.get("http_body"):
            keys = ("user_email", "client_ip", "user_agent", "http_response_code", "http_body", "event_id")
            shown = {k: record[k] for k in keys if k in record}
            print(f"a login as recorded (body capture on, password redacted):\n  {json.dumps(shown)}")
            return


def compare(records: list[dict[str, Any]], expected: Counter[Key]) -> bool:
    """Print the totals and any difference between the expected and the written records."""
    actual = Counter((r.get("http_method"), r.get("http_path"), r.get("http_response_code")) for r in records)
    same = actual == expected
    print(f"\nrecords: {len(records)}  expected: {sum(expected.values())}  match: {'yes' if same else 'NO'}")
    for key, n in sorted((expected - actual).items()):
        print(f"  missing {n}x {' '.join(map(str, key))}")
    for key, n in sorted((actual - expected).items(), key=str):
        print(f"  unexpected {n}x {' '.join(map(str, key))}")
    return same


def read_back(endpoint: str, start_us: int, want: int) -> None:
    """Best effort: query OpenObserve for this run's records and print them."""
    org, stream = os.environ.get("O2_AUDIT_ORG", "_meta"), os.environ.get("O2_AUDIT_STREAM", "audit")
    where = urlparse(endpoint)
    shown = where._replace(netloc=(where.hostname or "") + (f":{where.port}" if where.port else "")).geturl()
    print(f"\nrecords sent to {shown}  org {org}  stream {stream}")
    user, password = os.environ.get("O2_AUDIT_USER", ""), os.environ.get("O2_AUDIT_PASSWORD", "")
    sql = f"SELECT * FROM \"{stream}\" WHERE service_name = 'dashboards-api' ORDER BY _timestamp"
    query = {"query": {"sql": sql, "start_time": start_us, "end_time": int(time.time() * 1e6) + 60_000_000,
                       "from": 0, "size": 1000}}
    hits: list[dict[str, Any]] = []
    try:
        for _ in range(6):  # ingested records can take a moment to become searchable
            resp = requests.post(f"{endpoint.rstrip('/')}/api/{org}/_search", json=query,
                                 auth=(user, password), timeout=10)
            resp.raise_for_status()
            hits = resp.json().get("hits", [])
            if len(hits) >= want:
                break
            time.sleep(2)
    except (requests.RequestException, ValueError) as exc:
        print(f"could not read the records back ({type(exc).__name__}: {cut(str(exc), 120)})")
        print(f"delivery errors, if any, are in {LOG}")
        return
    print(f"read back {len(hits)} record(s) of this run (expected {want}):\n")
    print_table(hits)


def main() -> int:
    """Run the demo; 0 when the audit trail holds exactly the expected records."""
    OUT.mkdir(exist_ok=True)
    endpoint, path, offset = sink()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    start_us = int(time.time() * 1e6) - 1_000_000
    print(f"starting the example app on {base} (log: {LOG.relative_to(REPO)})")
    proc = start_app(port, endpoint)
    driver = Driver(base)
    wait_healthy(driver.http, base, proc)
    try:
        drive(driver)
    except (requests.RequestException, KeyError, TypeError) as exc:
        fail(f"{driver.last} failed: {type(exc).__name__}: {exc}", proc)
    want = sum(driver.expected.values())
    print(f"sent {sum(driver.sent.values())} requests ("
          + ", ".join(f"{k} {n}" for k, n in driver.sent.items())
          + f"); {want} expected in the audit trail (ingestion and probes are not audited)")
    print("stopping the app with SIGTERM ...")
    stop_app(proc)
    if path is None:
        read_back(endpoint, start_us, want)
        return 0
    text = path.read_bytes()[offset:].decode() if path.exists() else ""
    try:
        records = [json.loads(line) for line in text.split("\n") if line.strip()]
    except ValueError as exc:
        fail(f"{path} holds a line that is not JSON: {exc}")
    if not records:
        fail(f"no audit records were written to {path}")
    print()
    print_table(records)
    same = compare(records, driver.expected)
    show_login(records)
    print(f"file: {path}\nsee one whole record: head -1 {path} | python -m json.tool")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
