"""TLS and mTLS credentials from PEM files (TLS_* settings) for servers and for the channels to the agents."""

from __future__ import annotations

import grpc

from copilot.runtime.config import TlsSettings


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """None: serve plaintext. With client_ca_file the handshake fails for a client without a certificate
    signed by that CA."""
    if not tls.server_enabled:
        if tls.client_ca_file is not None:
            raise ValueError("TLS_CLIENT_CA_FILE needs TLS_CERT_FILE and TLS_KEY_FILE")
        return None
    assert tls.key_file is not None and tls.cert_file is not None  # server_enabled
    pair = (tls.key_file.read_bytes(), tls.cert_file.read_bytes())
    if tls.client_ca_file is not None:
        return grpc.ssl_server_credentials(
            [pair], root_certificates=tls.client_ca_file.read_bytes(), require_client_auth=True
        )
    return grpc.ssl_server_credentials([pair])


def channel_credentials(tls: TlsSettings) -> grpc.ChannelCredentials | None:
    """None: dial plaintext. The process's own cert/key are presented as the client certificate (mTLS)."""
    if not tls.client_enabled:
        return None
    assert tls.ca_file is not None  # client_enabled
    key = tls.key_file.read_bytes() if tls.key_file else None
    chain = tls.cert_file.read_bytes() if tls.cert_file else None
    return grpc.ssl_channel_credentials(
        root_certificates=tls.ca_file.read_bytes(), private_key=key, certificate_chain=chain
    )


def channel_options(tls: TlsSettings) -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", tls.server_name_override)] if tls.server_name_override else []
