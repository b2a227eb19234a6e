"""Client channels to the agents: round_robin over every resolved address, UNAVAILABLE retried by the
gRPC retry policy in the service config (no hand-written retry loops), OTel context in metadata."""

from __future__ import annotations

import json
from collections.abc import Callable

import grpc

from copilot.runtime.config import TlsSettings, message_size_options
from copilot.runtime.interceptors import on_behalf_of
from copilot.runtime.telemetry import client_interceptors
from copilot.runtime.tls import channel_credentials, channel_options


def service_config(service_names: list[str], *, max_attempts: int = 3) -> str:
    """round_robin over the addresses that are SERVING: client-side health checking watches grpc.health.v1 on
    every connection, so a replica still warming up (listening, NOT_SERVING) or draining after SIGTERM gets no new
    call, whatever DNS still lists (a Podman or compose alias lists a container as soon as it starts)."""
    return json.dumps(
        {
            "loadBalancingConfig": [{"round_robin": {}}],
            "healthCheckConfig": {"serviceName": ""},
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


def agent_channel(
    target: str,
    service_names: list[str],
    *,
    identity: Callable[[], str],
    max_message_bytes: int,
    tls: TlsSettings | None = None,
) -> grpc.aio.Channel:
    """A channel to one agent service. `target` may be `host:port` or `dns:///svc:port` (headless Service).
    Calls carry this service's token (`identity()`, see auth.ServiceIdentity) and the user they are made for
    (on_behalf_of) and, with TLS settings, run over (m)TLS."""
    tls = tls or TlsSettings()
    options = [
        ("grpc.service_config", service_config(service_names)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1_000),
        *message_size_options(max_message_bytes),
        *channel_options(tls),
    ]
    interceptors = [*client_interceptors(), *on_behalf_of(identity)]
    credentials = channel_credentials(tls)
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
