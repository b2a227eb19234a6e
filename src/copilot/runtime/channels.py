"""Client channels to the agents: round_robin over every resolved address, UNAVAILABLE retried by the
gRPC retry policy in the service config (no hand-written retry loops), OTel context in metadata."""
from __future__ import annotations

import json

import grpc

from copilot.runtime.config import message_size_options
from copilot.runtime.telemetry import client_interceptors


def service_config(service_names: list[str], *, max_attempts: int = 3) -> str:
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "methodConfig": [
                {
                    "name": [{"service": name} for name in service_names],
                    "retryPolicy": {
                        "maxAttempts": max_attempts,
                        "initialBackoff": "0.05s",
                        "maxBackoff": "0.5s",
                        "backoffMultiplier": 2,
                        "retryableStatusCodes": ["UNAVAILABLE"],
                    },
                }
            ],
        }
    )


def agent_channel(target: str, service_names: list[str], *, max_message_bytes: int) -> grpc.aio.Channel:
    """A channel to one agent service. `target` may be `host:port` or `dns:///svc:port` (headless Service)."""
    options = [
        ("grpc.service_config", service_config(service_names)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1_000),
        *message_size_options(max_message_bytes),
    ]
    return grpc.aio.insecure_channel(target, options=options, interceptors=client_interceptors())
