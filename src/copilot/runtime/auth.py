"""Who is calling, and may they: JWT bearer tokens (HS256 shared secret or RS256 public key) with `sub`,
`role` and `exp`, checked by PyJWT. The dev `Bearer technician-<id>` form is accepted only in dev mode.

Every service reads the same `AUTH_*` settings, so a token the orchestrator accepts is accepted by the agents
it forwards it to (the knowledge service checks the admin role for ingest/delete itself: callers inside the
cluster can reach it directly)."""

from __future__ import annotations

import enum
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grpc
import jwt
from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from copilot.runtime.config import data_dir
from copilot.text import as_data

log = logging.getLogger("copilot.auth")

DEV_TOKEN = re.compile(r"^(technician-[A-Za-z0-9][A-Za-z0-9._-]{0,63})$")
SUBJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@:-]{0,127}$")
DEFAULT_ISSUER = "manufacturing-copilot"
DEFAULT_AUDIENCE = "manufacturing-copilot"


def dev_secret_file(folder: Path | None = None) -> Path:
    """Where `copilot up` keeps the HS256 secret of a dev mesh (below the data dir), so `copilot token` can mint
    tokens it accepts."""
    return (folder or data_dir()) / "auth" / "dev-jwt-secret"


class Role(enum.IntEnum):
    """Ordered: a role may do everything the roles below it may. SERVICE is a workload, not a person (the
    orchestrator calling the agents on a user's behalf): it ranks below every user role, so it never passes a
    role check; AccessPolicy lets it call the agents' internal methods and the methods any user may call."""

    SERVICE = 0
    TECHNICIAN = 1
    ENGINEER = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, value: object) -> Role | None:
        return cls.__members__.get(str(value).upper()) if isinstance(value, str) else None

    @classmethod
    def named(cls, value: str) -> Role:
        """The role called `value`; ValueError for any other name."""
        role = cls.parse(value)
        if role is None:
            raise ValueError(f"unknown role {value!r}: technician, engineer, admin or service")
        return role


@dataclass(frozen=True)
class Principal:
    """Who is calling: the token's subject and role."""

    subject: str
    role: Role
    dev: bool = False  # authenticated by the dev-mode `technician-<id>` form

    def __str__(self) -> str:
        return f"{self.subject} ({self.role.label})"

    @property
    def is_service(self) -> bool:
        return self.role is Role.SERVICE


class AuthError(Exception):
    """A refused call: its code, the ErrorInfo reason name (copilot.runtime.errors.Reason) and the message."""

    def __init__(self, code: grpc.StatusCode, message: str, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or ("TOKEN_INVALID" if code is grpc.StatusCode.UNAUTHENTICATED else "ROLE_NOT_ALLOWED")


class AuthSettings(BaseSettings):
    """`AUTH_*` environment, read by every service and by `copilot token`."""

    model_config = SettingsConfigDict(env_prefix="AUTH_", extra="ignore")

    mode: Literal["jwt", "dev"] = Field("jwt", description="dev also accepts `Bearer technician-<id>`")
    jwt_secret: SecretStr = Field(SecretStr(""), description="HS256 shared secret")
    jwt_secret_file: Path | None = Field(None, description="file holding the HS256 secret (a mounted Secret)")
    jwt_public_key_file: Path | None = Field(None, description="PEM public key: RS256 tokens")
    issuer: str = DEFAULT_ISSUER
    audience: str = DEFAULT_AUDIENCE
    leeway_s: float = Field(30.0, ge=0, description="clock skew tolerated on exp/nbf/iat")
    max_token_lifetime_s: float = Field(
        86_400.0, gt=0, description="a token whose exp is further away than this is refused (a leaked token expires)"
    )
    agent_callers: Literal["service", "any"] = Field(
        "service",
        description="who may call the agents' internal methods (AnalyzeImage, Retrieve, Advise, ComposeReport): "
        "`service` = only a service token (the orchestrator's); `any` = any authenticated user too",
    )
    service_token_file: Path | None = Field(
        None,
        description="the service token this process presents to the agents (a mounted Secret, re-read when it "
        "changes); unset: minted with the HS256 secret",
    )

    def secret(self) -> str:
        if self.jwt_secret.get_secret_value():
            return self.jwt_secret.get_secret_value()
        if self.jwt_secret_file is not None:
            return self.jwt_secret_file.read_text().strip()
        return ""


class Authenticator:
    """Turns an `authorization` header into a Principal, or raises AuthError (UNAUTHENTICATED)."""

    def __init__(self, settings: AuthSettings | None = None) -> None:
        self.settings = settings or AuthSettings()
        self._keys: dict[str, str] = {}
        secret = self.settings.secret()
        if secret:
            if len(secret) < 32:
                raise ValueError("AUTH_JWT_SECRET must be at least 32 characters")
            self._keys["HS256"] = secret
        if self.settings.jwt_public_key_file is not None:
            self._keys["RS256"] = self.settings.jwt_public_key_file.read_text()
        if not self._keys and self.settings.mode != "dev":
            raise ValueError(
                "AUTH_MODE=jwt needs AUTH_JWT_SECRET(_FILE) (HS256) or AUTH_JWT_PUBLIC_KEY_FILE (RS256); "
                "AUTH_MODE=dev accepts the dev technician-<id> tokens instead"
            )
        # token -> (principal, expiry): a token verified once is not verified again until it expires
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        if self.settings.mode == "dev":
            log.warning("AUTH_MODE=dev: unsigned 'Bearer technician-<id>' tokens are accepted; never use in production")

    @property
    def algorithms(self) -> list[str]:
        return sorted(self._keys)

    def authenticate(self, authorization: str | None) -> Principal:
        if not authorization:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                "missing bearer token: send 'authorization: Bearer <token>'",
                "TOKEN_MISSING",
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "malformed authorization: expected 'Bearer <token>'")
        token = token.strip()
        if self.settings.mode == "dev" and (match := DEV_TOKEN.match(token)):
            return Principal(match.group(1), Role.TECHNICIAN, dev=True)
        if not self._keys:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                "token is not a dev token (technician-<id>) and no JWT key is configured",
            )
        cached = self._verified.get(token)
        if cached is not None:
            principal, expires = cached
            if time.time() < expires:
                return principal
            del self._verified[token]
        principal, expires = self._verify(token)
        self._verified[token] = (principal, expires)
        if len(self._verified) > self.VERIFIED_TOKENS:
            self._verified.popitem(last=False)
        return principal

    #: signed tokens whose verification is remembered (the oldest is forgotten first)
    VERIFIED_TOKENS = 4096

    def _verify(self, token: str) -> tuple[Principal, float]:
        """The principal of a signed token and the time it stops being valid (exp + leeway)."""
        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            if algorithm not in self._keys:  # refuses alg=none and algorithm-confusion (HS256 signed with a public key)
                shown = as_data(str(algorithm), 32)  # the header is the caller's: never echoed, logged or kept whole
                raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"token algorithm {shown!r} is not accepted")
            claims = jwt.decode(
                token,
                self._keys[algorithm],
                algorithms=[algorithm],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway_s,
                options={"require": ["sub", "exp", "role"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "token has expired", "TOKEN_EXPIRED") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, f"invalid token: {as_data(str(exc), 200)}") from None
        if float(claims["exp"]) - time.time() > self.settings.max_token_lifetime_s + self.settings.leeway_s:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED,
                f"token expires more than {self.settings.max_token_lifetime_s:.0f} s from now, longer than a token may "
                "live (AUTH_MAX_TOKEN_LIFETIME_S)",
            )
        role = Role.parse(claims.get("role"))
        if role is None:
            raise AuthError(
                grpc.StatusCode.UNAUTHENTICATED, "token role must be technician, engineer, admin or service"
            )
        subject = claims.get("sub")
        if not isinstance(subject, str) or not SUBJECT.match(subject):
            raise AuthError(grpc.StatusCode.UNAUTHENTICATED, "token subject is not a valid id")
        return Principal(subject, role), float(claims["exp"]) + self.settings.leeway_s


def mint_token(
    subject: str,
    role: Role,
    *,
    secret: str = "",
    private_key: str = "",
    ttl_s: float = 3600,
    issuer: str = DEFAULT_ISSUER,
    audience: str = DEFAULT_AUDIENCE,
    now: float | None = None,
) -> str:
    """A signed token: HS256 with `secret`, or RS256 with a PEM `private_key`."""
    if not SUBJECT.match(subject):
        raise ValueError(f"subject {subject!r} must be letters, digits and . _ @ : - (up to 128)")
    issued = int(now if now is not None else time.time())
    claims = {
        "sub": subject,
        "role": role.label,
        "iat": issued,
        "nbf": issued,
        "exp": issued + int(ttl_s),
        "iss": issuer,
        "aud": audience,
    }
    if private_key:
        return jwt.encode(claims, private_key, algorithm="RS256")
    if not secret:
        raise ValueError("a secret (HS256) or a private key (RS256) is needed to sign")
    return jwt.encode(claims, secret, algorithm="HS256")


def dev_secret(path: Path | None = None) -> str:
    """The local dev mesh's HS256 secret, created on first use (mode 0600)."""
    path = path or dev_secret_file()
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    value = secrets.token_urlsafe(48)
    path.write_text(value)
    path.chmod(0o600)
    return value


def signing_secret(dev_file: Path | None = None, *, create: bool = False) -> str:
    """The HS256 secret local tokens are signed with: AUTH_JWT_SECRET(_FILE) when set, else the dev mesh's secret
    file (created when `create`); "" when there is none."""
    secret = AuthSettings().secret()
    if secret:
        return secret
    dev_file = dev_file or dev_secret_file()
    return dev_secret(dev_file) if create or dev_file.exists() else ""


#: The metadata key naming the user an internal call is made for (trusted only from a service principal).
END_USER_HEADER = "x-copilot-end-user"
#: How long a minted service token lives (capped by AUTH_MAX_TOKEN_LIFETIME_S); it is renewed at half-life.
SERVICE_TOKEN_TTL_S = 3600.0


class ServiceIdentity:
    """The token a service presents to the agents it calls (`role: service`, subject = the service's name):
    read from AUTH_SERVICE_TOKEN_FILE (re-read when the file changes: a rotated Secret), else minted with the HS256
    secret and renewed at half-life. Without either (RS256 keys only) it cannot exist: ValueError."""

    def __init__(self, name: str, settings: AuthSettings | None = None) -> None:
        self.name = name
        self.settings = settings or AuthSettings()
        self._secret = "" if self.settings.service_token_file else self.settings.secret()
        if not self.settings.service_token_file and not self._secret:
            raise ValueError(
                f"the {name} service needs a service identity to call the agents: AUTH_SERVICE_TOKEN_FILE (a token "
                "with role `service`), or an HS256 secret to mint one (AUTH_JWT_SECRET(_FILE))"
            )
        self._token = ""
        self._renew_at = 0.0
        self._file_stamp: tuple[int, int] | None = None

    def header(self) -> str:
        """`Bearer <token>`, current."""
        path = self.settings.service_token_file
        if path is not None:
            stat = path.stat()
            if (stat.st_mtime_ns, stat.st_size) != self._file_stamp:
                self._token = path.read_text().strip()
                self._file_stamp = (stat.st_mtime_ns, stat.st_size)
        elif time.time() >= self._renew_at:
            ttl = min(SERVICE_TOKEN_TTL_S, self.settings.max_token_lifetime_s)
            self._token = mint_token(
                self.name,
                Role.SERVICE,
                secret=self._secret,
                ttl_s=ttl,
                issuer=self.settings.issuer,
                audience=self.settings.audience,
            )
            self._renew_at = time.time() + ttl / 2
        return f"Bearer {self._token}"


@dataclass(frozen=True)
class AccessPolicy:
    """The lowest role each method needs; methods not listed need `default`. Health and reflection are open.

    `internal` methods are the ones the orchestrator calls on a user's behalf (an agent's work: AnalyzeImage,
    Advise, ComposeReport…). With `AUTH_AGENT_CALLERS=service` (the default) only a service token may call them: a
    user's token, whatever its role, cannot reach an agent's work directly and skip the orchestrator's
    validation, rate limits and fair share. A service token may call the internal methods and those any user may
    call (listings), never one that needs a role."""

    default: Role = Role.TECHNICIAN
    methods: Mapping[str, Role] | None = (
        None  # full method path "/copilot.agents.v1.KnowledgeService/DeleteDocument" -> role
    )
    internal: frozenset[str] = frozenset()

    def required(self, method: str) -> Role:
        return (self.methods or {}).get(method, self.default)

    def refusal(self, principal: Principal, method: str, *, users_may_call_internal: bool = False) -> str | None:
        """Why `principal` may not call `method` (PERMISSION_DENIED), or None."""
        name = method.rsplit("/", 1)[-1]
        if method in self.internal:
            if principal.is_service:
                return None
            if users_may_call_internal:
                return self._role_refusal(principal, method)
            return (
                f"{name} is called by the orchestrator with its service token, not by users such as {principal}: "
                "send the request to CopilotService (AUTH_AGENT_CALLERS=any on the agent allows user tokens)"
            )
        if principal.is_service:
            needed = self.required(method)
            if needed > Role.TECHNICIAN:
                return f"{name} needs the {needed.label} role; a service token has none"
            return None
        return self._role_refusal(principal, method)

    def _role_refusal(self, principal: Principal, method: str) -> str | None:
        needed = self.required(method)
        if principal.role < needed:
            return f"{method} needs the {needed.label} role; {principal.subject} is a {principal.role.label}"
        return None
