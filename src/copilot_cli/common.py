"""What every command group shares: the consoles, the `--addr` / `--token` / `--data-dir` options (declared
once), one way of reporting a failed RPC, and the enum labels shown in tables."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, TypeVar

import grpc
import typer
from google.protobuf.message import Message
from rich.console import Console

from copilot.client import auth_metadata, open_channel, resolve_token
from copilot.runtime.config import DEFAULT_PORTS
from copilot.runtime.errors import field_violations

T = TypeVar("T")

console = Console(stderr=True)  # progress, tables about the run, errors
out = Console()  # the command's result

ORCHESTRATOR_ADDR = f"localhost:{DEFAULT_PORTS['orchestrator']}"
KNOWLEDGE_ADDR = f"localhost:{DEFAULT_PORTS['knowledge']}"
TOKEN_HELP = (
    "bearer token (default: a JWT minted with the local dev mesh's secret, <data dir>/auth/dev-jwt-secret; "
    "see `copilot token`)"
)

#: The public API (CopilotService) of a mesh.
OrchestratorAddr = Annotated[
    str, typer.Option("--addr", envvar="COPILOT_ADDR", help="the orchestrator (CopilotService)")
]
#: The knowledge agent's own API (KnowledgeService: documents).
KnowledgeAddr = Annotated[str, typer.Option("--addr", envvar="COPILOT_KNOWLEDGE_ADDR", help="the knowledge service")]
Token = Annotated[str, typer.Option("--token", envvar="COPILOT_TOKEN", help=TOKEN_HELP)]
#: For the methods that change what an agent holds (documents): an admin's token.
AdminToken = Annotated[
    str,
    typer.Option(
        "--token", envvar="COPILOT_TOKEN", help="an admin token (default: minted with the local dev mesh's secret)"
    ),
]
DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="COPILOT_DATA_DIR",
        help="the local mesh's data folder: its incident history, Chroma store, reference images, logs and dev "
        "signing secret (default: .copilot-data in the checkout, whatever the current directory)",
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="print the result as JSON")]


WHEN_FORMAT = (
    "an ISO date or time (2026-12-04, 2026-12-04T08:00, 2026-12-04T08:00+05:30; UTC unless it says otherwise), "
    "'now', 'today', 'yesterday', or an age such as 30m, 6h, 2d, 1w"
)
_AGE = re.compile(r"^(\d+)\s*([mhdw])$")
_AGE_UNITS = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_when(text: str) -> datetime:
    """A moment as a technician types it (see WHEN_FORMAT), as an aware UTC datetime."""
    value = text.strip().lower()
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    named = {"now": now, "today": midnight, "yesterday": midnight - timedelta(days=1)}
    if value in named:
        return named[value]
    age = _AGE.match(value)
    if age:
        return now - timedelta(**{_AGE_UNITS[age.group(2)]: int(age.group(1))})
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a time: expected {WHEN_FORMAT}") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def report_rpc_error(exc: grpc.RpcError) -> None:
    """The status code, its message and each field violation, the same way for every command."""
    from rich.markup import escape

    code = exc.code()
    name = code.name if code else "UNKNOWN"
    violations = field_violations(exc)
    if not violations:
        console.print(f"[bold red]{name}[/]: {escape(str(exc.details()))}")
        return
    # the status message lists the violations too: each is said once, on its own line
    console.print(
        f"[bold red]{name}[/]: the request was refused; correct {'these fields' if len(violations) > 1 else 'this field'}:"
    )
    for violation in violations:
        console.print(f"  • [bold]{escape(violation.field)}[/]: {escape(violation.description)}")


def describe_rpc_error(exc: grpc.RpcError) -> str:
    """One line for a table row: the field violations, else the status message."""
    return "; ".join(f"{v.field}: {v.description}" for v in field_violations(exc)) or str(exc.details())


@contextlib.contextmanager
def rpc_errors() -> Iterator[None]:
    """A failed RPC ends the command with exit code 2 after `report_rpc_error`."""
    try:
        yield
    except grpc.RpcError as exc:
        report_rpc_error(exc)
        raise typer.Exit(2) from None


@contextlib.contextmanager
def connected(addr: str, token: str, *, role: str = "technician") -> Iterator[tuple[grpc.Channel, tuple]]:
    """An open channel and the authorization metadata for it; RPC failures inside end the command (exit 2)."""
    with rpc_errors(), open_channel(addr) as channel:
        yield channel, auth_metadata(resolve_token(token, role=role))


def paged(
    fetch: Callable[[str, int], tuple[Sequence[T], str]], limit: int | None = None, page_size: int = 100
) -> list[T]:
    """Every item of a List method, page after page: `fetch(page_token, page_size)` gives (items, next token)."""
    found: list[T] = []
    token = ""
    while limit is None or len(found) < limit:
        items, token = fetch(token, page_size if limit is None else min(page_size, limit - len(found)))
        found.extend(items)
        if not token:
            break
    return found


def enum_label(message: Message, field: str, prefix: str) -> str:
    """`STAGE_STATE_DEGRADED` -> `degraded`: the enum value of `field` for tables."""
    value = getattr(message, field)
    enum = message.DESCRIPTOR.fields_by_name[field].enum_type
    if enum is None:
        raise TypeError(f"{field} is not an enum field")
    return str(enum.values_by_number[value].name).removeprefix(prefix).lower()


def shown(text: str, max_chars: int | None = None) -> str:
    """Text from the server (a user's notes, a problem, a stored report) as the terminal may show it: no control,
    bidi or zero-width character (an ESC sequence in someone's feedback would drive the terminal), no Rich markup
    ("[red]" is printed as typed), line breaks kept only where the text is a report laid out in lines."""
    from rich.markup import escape

    from copilot.text import as_data

    return escape("\n".join(as_data(line, max_chars) for line in text.split("\n")))
