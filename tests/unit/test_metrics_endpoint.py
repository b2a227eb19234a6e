"""The Prometheus endpoint serves `/metrics` and nothing else (it answered 200 on any path)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from copilot.runtime.telemetry import serve_metrics


def test_metrics_are_served_on_their_path_only():
    server = serve_metrics(0, "127.0.0.1")
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as reply:
            assert reply.status == 200 and b"# HELP" in reply.read()
        for path in ("/", "/admin", "/metrics/../etc/passwd", "/metricsx"):
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(f"{base}{path}", timeout=5)
            assert refused.value.code == 404, path
    finally:
        server.shutdown()
        server.server_close()
