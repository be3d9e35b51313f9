"""Start, watch and stop real server subprocesses for the zero-code and shutdown tests.

Every server runs under ``opentelemetry-instrument`` from the repository's virtual environment, in its own
session (``start_new_session=True``) so that teardown can kill the whole process group (gunicorn workers
included) with ``os.killpg``. Its stdout and stderr go to files in the test's ``tmp_path``; their tails are
appended to every assertion message. Waiting is always on a condition with a deadline (:func:`wait_until`).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any, Callable, Dict, List, Mapping, Optional, Sequence, TypeVar, Union

import requests

__all__ = [
    "APP",
    "REPO_ROOT",
    "AppProcess",
    "Launcher",
    "child_env",
    "free_port",
    "read_jsonl",
    "wait_until",
]

#: The repository root (cwd and PYTHONPATH of every subprocess).
REPO_ROOT = Path(__file__).resolve().parent.parent
#: The test application: external to examples/, no OpenTelemetry code in it.
APP = "tests.apps.audit_app:app"

_T = TypeVar("_T")
_Message = Union[str, Callable[[], str]]


def _venv_bin() -> Path:
    for candidate in (Path(sys.prefix) / "bin", REPO_ROOT / ".venv" / "bin"):
        if (candidate / "opentelemetry-instrument").exists():
            return candidate
    raise RuntimeError(f"no opentelemetry-instrument next to {sys.prefix} or in {REPO_ROOT / '.venv'}")


VENV_BIN = _venv_bin()


def wait_until(predicate: Callable[[], _T], timeout: float, message: _Message = "condition",
               interval: float = 0.02) -> _T:
    """Poll ``predicate`` until it returns something truthy (returned) or ``timeout`` seconds pass.

    On timeout raise AssertionError with ``message`` (a string or a callable building one, evaluated late
    so it can include the latest process output).
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            raise AssertionError(f"timed out after {timeout}s waiting for {text}")
        time.sleep(interval)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def child_env(overrides: Optional[Mapping[str, Optional[str]]] = None) -> Dict[str, str]:
    """``os.environ`` without any ``O2_AUDIT_*``/``OTEL_*`` variable, plus test defaults and ``overrides``.

    Defaults: all three OTel exporters ``none``, a service name, ``PYTHONPATH`` = repository root, unbuffered
    output. An override whose value is None removes the variable (e.g. to leave ``OTEL_TRACES_EXPORTER``
    unset so that opentelemetry-distro's default applies).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("O2_AUDIT_", "OTEL_"))}
    env.update(
        PYTHONPATH=str(REPO_ROOT),
        PYTHONUNBUFFERED="1",
        OTEL_TRACES_EXPORTER="none",
        OTEL_METRICS_EXPORTER="none",
        OTEL_LOGS_EXPORTER="none",
        OTEL_SERVICE_NAME="o2audit-subprocess-test",
    )
    if any(k.lower() in ("http_proxy", "https_proxy", "all_proxy") for k in env):
        for name in ("NO_PROXY", "no_proxy"):
            env[name] = ",".join(p for p in (env.get(name, ""), "127.0.0.1,localhost") if p)
    for key, value in (overrides or {}).items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def read_jsonl(path: Path) -> List[Dict[str, Any]]:
    """The records of a JSON-lines audit file; [] when it does not exist."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


class AppProcess:
    """One server subprocess (its own process group) with captured stdout/stderr."""

    def __init__(self, name: str, argv: Sequence[str], env: Mapping[str, str], port: int, logdir: Path) -> None:
        self.name = name
        self.argv = list(argv)
        self.port = port
        self.stdout_path = logdir / f"{name}.stdout"
        self.stderr_path = logdir / f"{name}.stderr"
        self._files: List[IO[bytes]] = [open(self.stdout_path, "wb"), open(self.stderr_path, "wb")]  # noqa: SIM115
        self.proc = subprocess.Popen(
            self.argv,
            cwd=REPO_ROOT,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=self._files[0],
            stderr=self._files[1],
            start_new_session=True,
        )
        self.pid = self.proc.pid  # also the process group id (start_new_session)
        self.http = requests.Session()
        self.http.trust_env = False

    # -- output ------------------------------------------------------------------------------------
    def stdout(self) -> str:
        return self.stdout_path.read_text(encoding="utf-8", errors="replace")

    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, chars: int = 3000) -> str:
        """The tails of stderr and stdout, for assertion messages."""
        state = "running" if self.proc.poll() is None else f"exited with {self.proc.returncode}"
        return (f"\n--- {self.name} ({state}) stderr tail ---\n{self.stderr()[-chars:]}"
                f"\n--- {self.name} stdout tail ---\n{self.stdout()[-chars // 2:]}\n--- end ---")

    # -- HTTP --------------------------------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request over the keep-alive session (10 s timeout unless given)."""
        kwargs.setdefault("timeout", 10)
        return self.http.request(method, self.url(path), **kwargs)

    def fresh_request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One request over a new connection (lets the kernel pick any worker of a pre-fork server)."""
        kwargs.setdefault("timeout", 10)
        headers = {"Connection": "close", **kwargs.pop("headers", {})}
        with requests.Session() as session:
            session.trust_env = False
            return session.request(method, self.url(path), headers=headers, **kwargs)

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode} before it served"
                                 f"{self.tail()}")
        try:
            return self.fresh_request("GET", "/healthz", timeout=1).status_code == 200
        except requests.RequestException:
            return False

    def wait_ready(self, timeout: float = 30.0) -> AppProcess:
        """Poll ``/healthz`` until it answers 200; fail early (with the output) if the process exits."""
        wait_until(self._healthy, timeout, lambda: f"{self.name} to answer /healthz{self.tail()}", interval=0.05)
        return self

    def threads(self) -> List[str]:
        """Names of the live threads of the worker that answers (the test app's debug route)."""
        response = self.request("GET", "/debug/threads")
        assert response.status_code == 200, f"/debug/threads -> {response.status_code}{self.tail()}"
        names: List[str] = response.json()
        return names

    # -- lifecycle ---------------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc.poll() is None

    def send_signal(self, signum: int) -> None:
        self.http.close()  # no idle keep-alive connection holds up the server's graceful shutdown
        self.proc.send_signal(signum)

    def wait_exit(self, timeout: float = 20.0) -> int:
        """Wait for the process to exit and return its status (negative: killed by that signal)."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.name} did not exit within {timeout}s{self.tail()}") from None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Send the real signal to the server's main process and wait for it to exit."""
        self.send_signal(signum)
        return self.wait_exit(timeout)

    def kill(self) -> None:
        """Kill whatever is left of the process group (teardown; safe to call twice)."""
        self.http.close()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        for handle in self._files:
            handle.close()


class Launcher:
    """Starts servers for one test and kills every one of them (and their workers) at teardown."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.started: List[AppProcess] = []

    def _start(self, name: str, argv: Sequence[str], env: Mapping[str, str], port: int) -> AppProcess:
        process = AppProcess(f"{name}-{len(self.started)}", argv, env, port, self.logdir)
        self.started.append(process)
        return process

    def uvicorn(self, env: Mapping[str, str], app: str = APP, *extra: str) -> AppProcess:
        """``opentelemetry-instrument uvicorn APP --host 127.0.0.1 --port <free>`` (not yet ready)."""
        port = free_port()
        argv = [str(VENV_BIN / "opentelemetry-instrument"), str(VENV_BIN / "uvicorn"), app,
                "--host", "127.0.0.1", "--port", str(port), *extra]
        return self._start("uvicorn", argv, env, port)

    def gunicorn(self, env: Mapping[str, str], app: str = APP, workers: int = 2, preload: bool = False) -> AppProcess:
        """``opentelemetry-instrument gunicorn -k uvicorn.workers.UvicornWorker -w N [--preload] APP``."""
        port = free_port()
        argv = [str(VENV_BIN / "opentelemetry-instrument"), str(VENV_BIN / "gunicorn"),
                "-k", "uvicorn.workers.UvicornWorker", "-w", str(workers), "-b", f"127.0.0.1:{port}",
                "--graceful-timeout", "15"]
        if _gunicorn_has_control_socket():
            argv.append("--no-control-socket")  # gunicorn >= 25.1: no shared $HOME/.gunicorn/gunicorn.ctl
        if preload:
            argv.append("--preload")
        argv.append(app)
        return self._start("gunicorn", argv, env, port)

    def cleanup(self) -> None:
        for process in self.started:
            process.kill()


def _gunicorn_has_control_socket() -> bool:
    try:
        from gunicorn.config import KNOWN_SETTINGS
    except ImportError:
        return False
    return any(setting.name == "control_socket_disable" for setting in KNOWN_SETTINGS)
