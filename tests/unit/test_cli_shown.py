"""What the CLI prints of server text: no control sequence reaches the terminal, no Rich markup is interpreted."""

from __future__ import annotations

from rich.console import Console

from copilot_cli.common import shown


def test_server_text_is_printed_as_typed_without_control_sequences():
    console = Console(record=True, force_terminal=True, width=200)
    console.print(shown("ok\x1b[31m [bold red]pwned[/] \x1b]0;title\x07 done"))
    text = console.export_text()
    assert "\x1b" not in shown("ok\x1b[31m") and "\x07" not in text
    assert "[bold red]pwned[/]" in text  # the markup is shown, not applied


def test_a_report_keeps_its_lines():
    report = "SUMMARY:\nline one\u2028still line one\n\nDEFECTS IDENTIFIED:"
    assert shown(report).split("\n") == ["SUMMARY:", "line one still line one", "", "DEFECTS IDENTIFIED:"]
