"""Server subprocesses for the trust tests, configured only through the environment.

Two ways to start :mod:`tests.apps_trust.trust_app` under ``opentelemetry-instrument`` with
``O2_AUDIT_ENABLED=true`` and a ``file://`` endpoint:

* :meth:`Servers.patched`: ``python -m tests.apps_trust.serve_patched`` (the framework hook applied from the
  environment, then uvicorn's own CLI): what zero-code setup does once the hook is wired into it;
* :meth:`Servers.zero_code`: plain ``opentelemetry-instrument uvicorn APP``.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Dict, List, Optional

from procs import VENV_BIN, AppProcess, child_env, free_port, read_jsonl, wait_until

APP = "tests.apps_trust.trust_app:app"
_counter = itertools.count()


class TrustServer:
    """One server and the JSON-lines audit file it writes."""

    def __init__(self, process: AppProcess, audit_path: Path) -> None:
        self.process = process
        self.audit_path = audit_path

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self.process.fresh_request(method, path, **kwargs)

    def records(self) -> List[Dict[str, Any]]:
        return read_jsonl(self.audit_path)

    def wait_records(self, count: int, timeout: float = 15.0) -> List[Dict[str, Any]]:
        """Wait until ``count`` records were published (the publish interval is 0.2 s); exactly ``count``."""
        wait_until(lambda: len(self.records()) >= count, timeout,
                   lambda: f"{count} audit records in {self.audit_path}{self.tail()}")
        records = self.records()
        assert len(records) == count, f"expected {count} records, got {records}{self.tail()}"
        return records

    def output(self) -> str:
        return self.process.stdout() + self.process.stderr()

    def tail(self) -> str:
        return self.process.tail()


class Servers:
    """Starts servers for one test; :meth:`cleanup` kills them all."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: List[AppProcess] = []

    def _env(self, audit_path: Path, overrides: Dict[str, Optional[str]]) -> Dict[str, str]:
        settings: Dict[str, Optional[str]] = {
            "O2_AUDIT_ENABLED": "true",
            "O2_AUDIT_ENDPOINT": f"file://{audit_path}",
            "O2_AUDIT_PUBLISH_INTERVAL": "0.2",
            "O2_AUDIT_REQUIRED": "true",
        }
        settings.update(overrides)
        return child_env(settings)

    def _start(self, name: str, argv: List[str], overrides: Dict[str, Optional[str]], port: int) -> TrustServer:
        index = next(_counter)
        audit_path = self.tmp_path / f"audit-{index}.jsonl"
        process = AppProcess(f"{name}-{index}", argv, self._env(audit_path, overrides), port, self.tmp_path)
        self.started.append(process)
        process.wait_ready()
        return TrustServer(process, audit_path)

    def patched(self, *extra: str, **env: Optional[str]) -> TrustServer:
        port = free_port()
        argv = [str(VENV_BIN / "opentelemetry-instrument"), str(VENV_BIN / "python"), "-m",
                "tests.apps_trust.serve_patched", APP, "--host", "127.0.0.1", "--port", str(port), *extra]
        return self._start("patched-uvicorn", argv, dict(env), port)

    def zero_code(self, *extra: str, **env: Optional[str]) -> TrustServer:
        port = free_port()
        argv = [str(VENV_BIN / "opentelemetry-instrument"), str(VENV_BIN / "uvicorn"), APP,
                "--host", "127.0.0.1", "--port", str(port), *extra]
        return self._start("uvicorn", argv, dict(env), port)

    def cleanup(self) -> None:
        for process in self.started:
            process.kill()
