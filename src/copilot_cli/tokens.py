"""`copilot token`: a signed JWT for a dev or test mesh."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

PemFile = typer.Option(exists=True, dir_okay=False)


def token(
    role: Annotated[str, typer.Option("--role", help="technician, engineer or admin")] = "technician",
    subject: Annotated[str, typer.Option("--subject", help="the `sub` claim (default: <role>-cli)")] = "",
    ttl: Annotated[float, typer.Option("--ttl", min=1, help="seconds until it expires")] = 3600,
    secret_file: Annotated[
        Path | None,
        typer.Option(
            "--secret-file",
            exists=True,
            dir_okay=False,
            help="HS256 secret (default: AUTH_JWT_SECRET(_FILE), else the dev mesh's <data dir>/auth/dev-jwt-secret)",
        ),
    ] = None,
    private_key: Annotated[
        Path | None, typer.Option("--private-key", exists=True, dir_okay=False, help="PEM private key: an RS256 token")
    ] = None,
) -> None:
    """Mint a signed JWT for a dev or test mesh and print it (use it as COPILOT_TOKEN or --token)."""
    from copilot.runtime.auth import AuthSettings, Role, mint_token, signing_secret

    parsed = Role.parse(role)
    if parsed is None:
        raise typer.BadParameter("--role is technician, engineer or admin")
    settings = AuthSettings()
    pem = private_key.read_text() if private_key is not None else ""
    secret = "" if pem else (secret_file.read_text().strip() if secret_file else signing_secret(create=True))
    try:
        value = mint_token(
            subject or f"{role}-cli",
            parsed,
            secret=secret,
            private_key=pem,
            ttl_s=ttl,
            issuer=settings.issuer,
            audience=settings.audience,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    print(value)
