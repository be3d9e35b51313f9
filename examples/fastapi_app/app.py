"""A small org-scoped API shaped like OpenObserve's, used to demonstrate otel-o2audit.

There is deliberately no OpenTelemetry code in this file: run it unmodified under
``opentelemetry-instrument`` (zero-code setup), or import it from ``code_setup.py`` (explicit setup).
The one line that knows about auditing is the ``set_user`` call in ``current_user``: it names the acting
user on the request's audit record. Everything else (method, path, status, duration, errors...) comes from
the HTTP server span that the FastAPI instrumentation creates.
"""

import json
import secrets
import threading
from collections import Counter
from dataclasses import dataclass
from typing import Annotated, Any, Optional

from fastapi import Depends, FastAPI, HTTPException, Request, Response
from fastapi.responses import PlainTextResponse
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from pydantic import BaseModel, Field

from otel_o2audit import set_user

app = FastAPI(title="dashboards-api", version="1.0.0")


# --- users and authentication ----------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    email: str
    password: str
    is_admin: bool
    orgs: frozenset[str]


# Demo users with clear-text passwords: fine for an example, never for a real service.
USERS: dict[str, User] = {
    u.email: u
    for u in (
        User("admin@example.com", "admin-pass", True, frozenset({"acme", "globex"})),
        User("alice@example.com", "alice-pass", False, frozenset({"acme"})),
        User("bob@example.com", "bob-pass", False, frozenset({"globex"})),
    )
}

basic_auth = HTTPBasic(auto_error=False)


def authenticate(email: str, password: str) -> Optional[User]:
    """The user with this email and password, or None."""
    user = USERS.get(email)
    if user is None or not secrets.compare_digest(password.encode(), user.password.encode()):
        return None
    return user


async def current_user(credentials: Annotated[Optional[HTTPBasicCredentials], Depends(basic_auth)]) -> User:
    """Authenticate the caller by HTTP Basic and name them on the request's audit record."""
    user = authenticate(credentials.username, credentials.password) if credentials else None
    if user is None:
        raise HTTPException(401, "invalid or missing credentials", {"WWW-Authenticate": "Basic"})
    set_user(user.email)  # -> user_email of this request's audit record (never the password)
    return user


async def org_member(org_id: str, user: Annotated[User, Depends(current_user)]) -> User:
    """The authenticated user, provided they belong to the organization in the path (else 403)."""
    if org_id not in user.orgs:
        raise HTTPException(403, f"{user.email} is not a member of {org_id}")
    return user


CurrentUser = Annotated[User, Depends(current_user)]
OrgUser = Annotated[User, Depends(org_member)]


class LoginRequest(BaseModel):
    email: str
    password: str


@app.post("/auth/login")
async def login(body: LoginRequest) -> dict[str, str]:
    """Exchange email and password for a (fake) session token."""
    user = authenticate(body.email, body.password)
    if user is None:
        raise HTTPException(401, "invalid email or password")
    set_user(user.email)  # login is not behind current_user, so name the user here
    return {"email": user.email, "token": secrets.token_urlsafe(24), "token_type": "session"}


# --- dashboards --------------------------------------------------------------------------------------------


class DashboardIn(BaseModel):
    title: str = Field(min_length=1, max_length=200)
    description: str = ""
    panels: list[dict[str, Any]] = Field(default_factory=list)


class Dashboard(DashboardIn):
    dashboard_id: str
    owner: str
    version: int = 1


class DashboardStore:
    """Dashboards per organization, in memory. Plain ``def`` handlers run in a thread pool: hence the lock."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[tuple[str, str], Dashboard] = {}
        self._next_id = 1

    def in_org(self, org_id: str) -> list[Dashboard]:
        with self._lock:
            return [d for (org, _), d in self._items.items() if org == org_id]

    def create(self, org_id: str, data: DashboardIn, owner: str) -> Dashboard:
        with self._lock:
            dashboard = Dashboard(**data.model_dump(), dashboard_id=str(self._next_id), owner=owner)
            self._next_id += 1
            self._items[(org_id, dashboard.dashboard_id)] = dashboard
            return dashboard

    def get(self, org_id: str, dashboard_id: str) -> Optional[Dashboard]:
        with self._lock:
            return self._items.get((org_id, dashboard_id))

    def update(self, org_id: str, dashboard_id: str, data: DashboardIn) -> Optional[Dashboard]:
        with self._lock:
            old = self._items.get((org_id, dashboard_id))
            if old is None:
                return None
            new = old.model_copy(update={**data.model_dump(), "version": old.version + 1})
            self._items[(org_id, dashboard_id)] = new
            return new

    def delete(self, org_id: str, dashboard_id: str) -> bool:
        with self._lock:
            return self._items.pop((org_id, dashboard_id), None) is not None

    def counts(self) -> Counter[str]:
        with self._lock:
            return Counter(org for org, _ in self._items)


dashboards = DashboardStore()


def not_found(org_id: str, dashboard_id: str) -> HTTPException:
    return HTTPException(404, f"dashboard {dashboard_id} not found in {org_id}")


@app.get("/api/{org_id}/dashboards")
def list_dashboards(org_id: str, user: OrgUser, page: int = 1, page_size: int = 20) -> dict[str, Any]:
    items = dashboards.in_org(org_id)
    start = (max(page, 1) - 1) * page_size
    return {"dashboards": items[start : start + page_size], "page": page, "total": len(items)}


@app.post("/api/{org_id}/dashboards", status_code=201)
def create_dashboard(org_id: str, body: DashboardIn, user: OrgUser) -> Dashboard:
    return dashboards.create(org_id, body, owner=user.email)


@app.get("/api/{org_id}/dashboards/{dashboard_id}")
def get_dashboard(org_id: str, dashboard_id: str, user: OrgUser) -> Dashboard:
    dashboard = dashboards.get(org_id, dashboard_id)
    if dashboard is None:
        raise not_found(org_id, dashboard_id)
    return dashboard


@app.put("/api/{org_id}/dashboards/{dashboard_id}")
def update_dashboard(org_id: str, dashboard_id: str, body: DashboardIn, user: OrgUser) -> Dashboard:
    dashboard = dashboards.update(org_id, dashboard_id, body)
    if dashboard is None:
        raise not_found(org_id, dashboard_id)
    return dashboard


@app.delete("/api/{org_id}/dashboards/{dashboard_id}", status_code=204)
def delete_dashboard(org_id: str, dashboard_id: str, user: OrgUser) -> Response:
    if not dashboards.delete(org_id, dashboard_id):
        raise not_found(org_id, dashboard_id)
    return Response(status_code=204)


# --- failures worth auditing -------------------------------------------------------------------------------


@app.get("/api/{org_id}/reports/broken")
def broken_report(org_id: str, user: OrgUser) -> None:
    """A bug: the unhandled exception becomes a 500, and its message the record's error_msg."""
    raise RuntimeError(f"report renderer crashed for org {org_id}")


@app.delete("/api/{org_id}/settings", status_code=204)
def reset_settings(org_id: str, user: OrgUser) -> Response:
    """Only administrators may reset an organization's settings; anyone else gets a 403."""
    if not user.is_admin:
        raise HTTPException(403, "only administrators can reset organization settings")
    return Response(status_code=204)


# --- ingestion (high volume: counted here, but not audited by default) -----------------------------------

ingested: Counter[tuple[str, str]] = Counter()  # (org, stream) -> records
ingested_lock = threading.Lock()


def accept(org_id: str, stream: str, records: int) -> dict[str, Any]:
    """Count accepted records and answer the way OpenObserve's ingestion API does."""
    with ingested_lock:
        ingested[(org_id, stream)] += records
    return {"code": 200, "status": [{"name": stream, "successful": records, "failed": 0}]}


async def json_body(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError as exc:
        raise HTTPException(400, f"invalid JSON: {exc}") from exc


def count_otlp(payload: Any, *path: str) -> int:
    """Count the leaves of an OTLP/JSON payload, e.g. resourceLogs -> scopeLogs -> logRecords."""
    items = [payload]
    for key in path:
        items = [child for item in items if isinstance(item, dict) for child in item.get(key) or []]
    return len(items)


@app.post("/api/{org_id}/{stream}/_json")
async def ingest_json(org_id: str, stream: str, request: Request, user: OrgUser) -> dict[str, Any]:
    records = await json_body(request)
    return accept(org_id, stream, len(records) if isinstance(records, list) else 1)


@app.post("/api/{org_id}/_bulk")
async def ingest_bulk(org_id: str, request: Request, user: OrgUser) -> dict[str, Any]:
    """Elasticsearch-style NDJSON: an action line (``{"index": {"_index": "stream"}}``), then a document."""
    lines = [line for line in (await request.body()).decode().splitlines() if line.strip()]
    streams: Counter[str] = Counter()
    try:
        for action in map(json.loads, lines[::2]):
            target = next(iter(action.values()), {})
            streams[target.get("_index", "default")] += 1
    except (ValueError, AttributeError) as exc:
        raise HTTPException(400, f"invalid bulk request: {exc}") from exc
    for stream, records in streams.items():
        accept(org_id, stream, records)
    return {"took": 1, "errors": False, "items": sum(streams.values())}


@app.post("/api/{org_id}/v1/logs")
async def ingest_otlp_logs(org_id: str, request: Request, user: OrgUser) -> dict[str, Any]:
    payload = await json_body(request)
    accept(org_id, "default", count_otlp(payload, "resourceLogs", "scopeLogs", "logRecords"))
    return {"partialSuccess": {}}


@app.post("/v1/traces")
async def ingest_otlp_traces(request: Request, user: CurrentUser) -> dict[str, Any]:
    """OTLP/HTTP traces; as in OpenObserve the organization comes from the ``organization`` header."""
    org_id = request.headers.get("organization", "default")
    if org_id not in user.orgs:
        raise HTTPException(403, f"{user.email} is not a member of {org_id}")
    payload = await json_body(request)
    accept(org_id, "traces", count_otlp(payload, "resourceSpans", "scopeSpans", "spans"))
    return {"partialSuccess": {}}


# --- probes (never audited by default) ---------------------------------------------------------------------


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/metrics", response_class=PlainTextResponse)
def metrics() -> str:
    """Prometheus text format."""
    lines = [
        "# HELP demo_ingested_records_total Records accepted by the ingestion routes.",
        "# TYPE demo_ingested_records_total counter",
    ]
    with ingested_lock:
        for (org, stream), n in ingested.items():
            lines.append(f'demo_ingested_records_total{{org="{org}",stream="{stream}"}} {n}')
    lines += ["# HELP demo_dashboards Dashboards currently stored.", "# TYPE demo_dashboards gauge"]
    lines += [f'demo_dashboards{{org="{org}"}} {n}' for org, n in dashboards.counts().items()]
    return "\n".join(lines) + "\n"
