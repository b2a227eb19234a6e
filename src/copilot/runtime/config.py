"""Configuration base classes (pydantic-settings): every service reads its settings from the environment."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SecretsSettingsSource, SettingsConfigDict

from copilot.images import ImageLimits

# Documented default ports of the mesh; `copilot up` and the Kubernetes manifests use the same numbers.
DEFAULT_PORTS = {"orchestrator": 50051, "vision": 50052, "knowledge": 50053, "report": 50054}
DEFAULT_METRICS_PORTS = {"orchestrator": 9464, "vision": 9465, "knowledge": 9466, "report": 9467}
#: The largest gRPC message a server accepts and a channel sends (a 10 MiB photo plus its request).
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


def project_root() -> Path | None:
    """The checkout this code runs from (an editable install: `make install`), or None (a package installed into
    site-packages, as in the images)."""
    root = Path(__file__).resolve().parents[3]
    return root if (root / "pyproject.toml").is_file() and (root / "services").is_dir() else None


def incident_history_url(folder: Path | None = None) -> str:
    """The orchestrator's default incident history: a SQLite file in `folder` (default: `data_dir()`)."""
    return f"sqlite:///{(folder or data_dir()) / 'incidents.db'}"


def data_dir() -> Path:
    """Where a process keeps its local state (reference images, the embedded Chroma store, the incident
    history, logs, the dev signing secret): COPILOT_DATA_DIR, else the checkout's `.copilot-data` (the same folder
    from whatever directory a command runs), else `.copilot-data` in the working directory. Each setting that
    names a file below it can still be set on its own."""
    setting = os.environ.get("COPILOT_DATA_DIR")
    if setting:
        return Path(setting)
    root = project_root()
    return root / ".copilot-data" if root is not None else Path(".copilot-data")


class TlsSettings(BaseSettings):
    """`TLS_*`: one set of files per process, used by its server and by its channels to the agents.
    No cert/key: plaintext. With client_ca_file the server requires client certificates (mTLS)."""

    model_config = SettingsConfigDict(env_prefix="TLS_", extra="ignore")

    cert_file: Path | None = Field(None, description="PEM certificate chain this process presents")
    key_file: Path | None = Field(None, description="PEM private key of cert_file")
    ca_file: Path | None = Field(None, description="PEM CA bundle that signs the servers this process calls")
    client_ca_file: Path | None = Field(None, description="PEM CA that signs client certificates; set = require mTLS")
    server_name_override: str = Field("", description="expected server name when it differs from the host dialled")

    @property
    def server_enabled(self) -> bool:
        return self.cert_file is not None and self.key_file is not None

    @property
    def client_enabled(self) -> bool:
        return self.ca_file is not None


def secrets_dir() -> Path | None:
    """COPILOT_SECRETS_DIR: a folder of files, each named after the variable it sets (lower-case, e.g.
    `orchestrator_database_url`): how a mounted Kubernetes Secret reaches the settings without putting a credential
    in an environment variable (where /proc/<pid>/environ, crash dumps and `kubectl describe` show it)."""
    folder = os.environ.get("COPILOT_SECRETS_DIR")
    return Path(folder) if folder else None


class ServerSettings(BaseSettings):
    """What every gRPC server process reads. Subclasses set `env_prefix` (e.g. VISION_). A variable set in the
    environment wins over the same name's file in COPILOT_SECRETS_DIR."""

    model_config = SettingsConfigDict(extra="ignore")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        folder = secrets_dir()
        mounted = (SecretsSettingsSource(settings_cls, secrets_dir=folder),) if folder and folder.is_dir() else ()
        return (init_settings, env_settings, dotenv_settings, *mounted, file_secret_settings)

    host: str = Field("127.0.0.1", description="interface to bind; 0.0.0.0 in containers")
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port")
    probe_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="a second, plaintext port that serves only grpc.health.v1 (no service, no reflection), for the "
        "kubelet's native gRPC probes, which cannot speak TLS; unset: none (0 picks a free port)",
    )
    grace_seconds: float = Field(10.0, gt=0, description="drain time after SIGTERM")
    shutdown_delay_s: float = Field(
        0.0,
        ge=0,
        description="after SIGTERM, NOT_SERVING at once but calls still taken this long before the drain, so "
        "balancers watching health move away first (Kubernetes: the preStop sleep does this instead)",
    )
    # A client resolves `dns:///service` when it connects and again only when a connection ends: without an age
    # limit a replica added under load (an HPA scale-up) got none of the calls of the clients already connected
    # (0 of 1,238 in its first minute). Each connection is closed after this age (GOAWAY, +-10 % jitter), calls on
    # it get `max_connection_age_grace_s` to finish, and the client re-resolves and spreads over every replica.
    max_connection_age_s: float = Field(30.0, gt=0, description="a connection's lifetime; 0 is not allowed")
    max_connection_age_grace_s: float = Field(60.0, gt=0, description="time calls on an aged connection get")
    max_message_bytes: int = Field(DEFAULT_MAX_MESSAGE_BYTES, gt=0)
    # An agent's own defence (its internal methods, see AccessPolicy.internal and FairShareInterceptor); the
    # orchestrator sets max_in_flight for its diagnoses instead.
    max_in_flight: int = Field(256, ge=1, description="calls of the work methods held at once, running and waiting")
    max_running_per_caller: int = Field(8, ge=1, description="one caller's calls that run at once; more wait")
    max_queued_per_caller: int = Field(64, ge=0, description="one caller's calls that may wait; more are refused")
    max_health_watches_per_connection: int = Field(16, ge=1, description="open health Watch streams per peer")
    max_health_watches: int = Field(1000, ge=1, description="open health Watch streams in all")
    log_level: str = "INFO"
    metrics_host: str = Field(
        "", description="interface of the Prometheus /metrics endpoint; empty: the gRPC port's (`host`)"
    )
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 disables")
    tls: TlsSettings = Field(default_factory=TlsSettings)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    """The same limits for servers and channels, so a message one side accepts the other can send."""
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
    ]


_IMAGE = ImageLimits()


class ImageLimitSettings(BaseSettings):
    """`<PREFIX>_MAX_IMAGE_*`: the image limits of a service that takes photos (the orchestrator's edge, vision),
    under its own prefix; defaults are `copilot.images.ImageLimits`'."""

    max_image_bytes: int = Field(_IMAGE.max_bytes, gt=0)
    max_image_pixels: int = Field(_IMAGE.max_pixels, gt=0, description="decompression-bomb guard, from the header")
    max_image_side: int = Field(_IMAGE.max_side, gt=0, description="longest side in pixels")
    max_image_aspect: float = Field(_IMAGE.max_aspect, ge=1, description="longer side / shorter side")
    max_image_decoded_pixels: int = Field(
        _IMAGE.max_decoded_pixels, gt=0, description="PNG/WebP pixel limit (they are decoded whole)"
    )

    def image_limits(self) -> ImageLimits:
        return ImageLimits(
            self.max_image_bytes,
            self.max_image_pixels,
            self.max_image_side,
            self.max_image_aspect,
            self.max_image_decoded_pixels,
        )
