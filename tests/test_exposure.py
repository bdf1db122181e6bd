"""Safe defaults: loopback binding, odd names exported safely and stored intact, file modes."""

from __future__ import annotations

import logging
import os
import stat

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import actmon
from actmon import store
from actmon.sinks.prometheus import MAX_LABEL
from tests.helpers import fetch_when

ODD = 'la"yer\\n\nnaïve ✓ {x="1"}'


def _odd_model(name: str) -> nn.Module:
    model = nn.ModuleDict({name: nn.Sequential(nn.Linear(4, 4), nn.ReLU())})
    model.forward = lambda x: model[name](x)  # type: ignore[method-assign]
    return model


def _run(model, tmp_path, run, **sinks):
    path = tmp_path / "run.db"
    cfg = {"store": {"path": str(path)}, **sinks}
    monitor = actmon.watch(model, run_name=run, log_every=1, sample_every=1, sinks=cfg)
    model(torch.randn(2, 4)).sum().backward()
    monitor.step(loss=torch.tensor(1.0))
    return monitor, path


def test_odd_names_are_escaped_in_exposition_and_stored_intact(tmp_path):
    run = 'run "quoted"\nnext ü'
    model = _odd_model(ODD)
    monitor, path = _run(model, tmp_path, run, prometheus={"enabled": True, "port": 0})
    text = fetch_when(monitor.prometheus_url, "actmon_activation_mean")
    monitor.close()
    samples = [
        s
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "actmon_activation_mean"
    ]
    assert {s.labels["layer"] for s in samples} == {f"{ODD}.0", f"{ODD}.1"}
    assert {s.labels["run"] for s in samples} == {run}
    with store.open(path) as db:
        assert db.run().run == run
        assert {layer for _, layer, _, _ in db.metrics("mean")} == {f"{ODD}.0", f"{ODD}.1"}


def test_huge_names_are_bounded_in_labels_but_kept_in_the_store(tmp_path):
    name = "x" * 5000
    model = _odd_model(name)
    monitor, path = _run(model, tmp_path, "r" * 3000, prometheus={"enabled": True, "port": 0})
    text = fetch_when(monitor.prometheus_url, "actmon_activation_mean")
    monitor.close()
    labels = [
        s.labels
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == "actmon_activation_mean"
    ]
    assert labels
    assert all(len(v) <= MAX_LABEL for lab in labels for v in lab.values())
    with store.open(path) as db:
        assert {layer for _, layer, _, _ in db.metrics("mean")} == {f"{name}.0", f"{name}.1"}


def test_binding_beyond_loopback_is_a_warning(caplog):
    model = nn.Sequential(nn.Linear(4, 4))
    sinks = {
        "store": {"enabled": False},
        "prometheus": {"enabled": True, "port": 0, "host": "0.0.0.0"},
    }
    with caplog.at_level(logging.WARNING, logger="actmon"):
        actmon.watch(model, sinks=sinks).close()
    assert any("reachable from other machines" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="actmon"):
        actmon.watch(model, sinks={**sinks, "prometheus": {"enabled": True, "port": 0}}).close()
    assert not any("reachable" in r.getMessage() for r in caplog.records)


def test_store_files_follow_the_umask(tmp_path):
    old = os.umask(0o077)
    try:
        monitor, path = _run(nn.Sequential(nn.Linear(4, 4)), tmp_path, "private")
        monitor.close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


def test_yaml_is_loaded_safely(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("run_name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(actmon.ConfigError, match="is not valid YAML"):  # safe_load refuses it
        actmon.load_config(path)


def test_endpoint_over_tls(tmp_path):
    import shutil
    import ssl
    import subprocess
    import urllib.request

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    sinks = {
        "store": {"enabled": False},
        "prometheus": {
            "enabled": True,
            "port": 0,
            "tls_cert_file": str(cert),
            "tls_key_file": str(key),
        },
    }
    with actmon.watch(model, log_every=1, sinks=sinks) as monitor:
        model(torch.randn(2, 4)).sum().backward()
        monitor.step()
        url = monitor.prometheus_url
        assert url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(cert))

        def fetch() -> str:
            with urllib.request.urlopen(url, context=context, timeout=5) as response:
                return response.read().decode()

        from tests.helpers import wait_for

        text = wait_for(lambda: (body := fetch()) and "actmon_step" in body and body)
        assert "actmon_activation_mean" in text
        import http.client

        # Plain HTTP is not served: the TLS socket drops the connection.
        with pytest.raises((http.client.RemoteDisconnected, ConnectionResetError)):
            urllib.request.urlopen(url.replace("https", "http"), timeout=5)


def test_tls_settings_must_come_in_pairs():
    with pytest.raises(actmon.ConfigError, match="tls_cert_file and tls_key_file must be given"):
        actmon.load_config(sinks={"prometheus": {"tls_cert_file": "c.pem"}})


def test_pushgateway_basic_auth_reads_the_password_from_the_environment(monkeypatch):
    import base64
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Gateway(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            seen.append(self.headers.get("Authorization"))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Gateway)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("ACTMON_PUSHGATEWAY_PASSWORD", "s3cret")
    try:
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
        sinks = {
            "store": {"enabled": False},
            "prometheus": {
                "enabled": True,
                "mode": "pushgateway",
                "pushgateway_url": f"http://127.0.0.1:{server.server_port}",
                "pushgateway_username": "ci",
            },
        }
        with actmon.watch(model, log_every=1, sinks=sinks) as monitor:
            model(torch.randn(2, 4)).sum().backward()
            monitor.step()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    expected = "Basic " + base64.b64encode(b"ci:s3cret").decode()
    assert seen
    assert set(seen) == {expected}
    assert monitor.errors == {}
