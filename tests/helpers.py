"""Real Prometheus / Pushgateway servers for integration tests, bound to 127.0.0.1."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from actmon.sinks.prometheus import free_port


def require(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.skip(f"{binary} is not installed (Debian package; .ci/run installs it)")
    return path


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except OSError as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}: last {last!r}")


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


class Server:
    """A child process started on 127.0.0.1 and stopped by its PID."""

    def __init__(self, args: list[str], url: str, ready_path: str) -> None:
        self.url = url
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            wait_for(
                lambda: self.proc.poll() is None and http_get(url + ready_path) is not None,
                timeout=30,
                what=f"{args[0]} to be ready",
            )
        except AssertionError:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()


def start_prometheus(
    tmp: Path,
    targets: list[str],
    honor_labels: bool = False,
    interval: str = "1s",
    rule_files: list[Path] = (),  # type: ignore[assignment]
    alertmanagers: list[str] = (),  # type: ignore[assignment]
) -> Server:
    """A Prometheus scraping ``targets`` every ``interval`` (and evaluating ``rule_files`` as
    often, sending what fires to ``alertmanagers``, host:port)."""
    binary = require("prometheus")
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    config = tmp / "prometheus.yml"
    rules = f"rule_files: {json.dumps([str(p) for p in rule_files])}\n" if rule_files else ""
    if alertmanagers:
        rules += (
            "alerting:\n  alertmanagers:\n    - static_configs:\n"
            f"        - targets: {json.dumps(list(alertmanagers))}\n"
        )
    config.write_text(
        f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n{rules}"
        "scrape_configs:\n  - job_name: actmon\n"
        f"    honor_labels: {str(honor_labels).lower()}\n"
        f"    static_configs:\n      - targets: {json.dumps(targets)}\n"
    )
    (tmp / "tsdb").mkdir()
    return Server(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        f"http://127.0.0.1:{port}",
        "/-/ready",
    )


def start_pushgateway(tmp: Path) -> Server:
    binary = require("prometheus-pushgateway")
    port = free_port()
    return Server(
        [
            binary,
            f"--web.listen-address=127.0.0.1:{port}",
            f"--persistence.file={tmp / 'pushgateway.db'}",
        ],
        f"http://127.0.0.1:{port}",
        "/-/ready",
    )


def start_alertmanager(tmp: Path, config: Path) -> Server:
    """An Alertmanager on 127.0.0.1 with clustering off (its gossip port would bind 0.0.0.0)."""
    binary = require("prometheus-alertmanager")
    port = free_port()
    (tmp / "am-data").mkdir(parents=True, exist_ok=True)
    return Server(
        [
            binary,
            f"--config.file={config}",
            f"--storage.path={tmp / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        f"http://127.0.0.1:{port}",
        "/-/ready",
    )


class WebhookReceiver:
    """Records every webhook notification POSTed to it: (path, the JSON payload)."""

    def __init__(self) -> None:
        import http.server
        import threading

        received = self.received = []  # type: list[tuple[str, dict[str, Any]]]

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.append((self.path, json.loads(body)))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def at(self, path: str) -> list[dict[str, Any]]:
        return [payload for p, payload in list(self.received) if p == path]

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def prom_query(server: Server, query: str) -> list[dict[str, Any]]:
    url = f"{server.url}/api/v1/query?query={urllib.parse.quote(query)}"
    body = json.loads(http_get(url))
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def fetch_when(url: str, needle: str, timeout: float = 30.0) -> str:
    """GET ``url`` until the body contains ``needle`` (sinks write on their own thread)."""

    def check() -> str | None:
        text = http_get(url)
        return text if needle in text else None

    return str(wait_for(check, timeout, what=f"{needle!r} at {url}"))


def train_steps(
    monitor: Any,
    model: Any,
    steps: int,
    batch: int = 8,
    features: int = 6,
    loss: float | None = None,
) -> None:
    """SGD steps on random inputs, ending each with ``monitor.step``; ``loss`` fixes the value
    passed to it (else the real loss is passed)."""
    import torch

    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(steps):
        real = model(torch.randn(batch, features)).pow(2).mean()
        real.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(loss=real if loss is None else torch.tensor(loss))
