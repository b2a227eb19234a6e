"""The `copilot` command: one Typer app, its commands grouped by module (mesh, diagnose, history, equipment,
knowledge, tokens, bench). Each group imports what it needs when it runs, so `copilot health` works in every image."""

from __future__ import annotations

import typer

from copilot_cli import bench, diagnose, equipment, history, knowledge, mesh, tokens
from copilot_cli.monitoring import monitoring

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Manufacturing Copilot mesh")

# the local mesh
app.command()(mesh.up)
app.command()(mesh.status)
app.command()(mesh.health)
# the public API
app.command()(diagnose.diagnose)
app.command()(history.incidents)
app.command()(history.incident)
app.command()(history.feedback)
app.command()(equipment.equipment)
# the knowledge library
app.command()(knowledge.ingest)
app.command()(knowledge.docs)
app.command("delete-doc")(knowledge.delete_doc)
app.command("eval")(knowledge.evaluate)
app.command("export-feedback")(knowledge.export_feedback)
# credentials and measurements
app.command()(tokens.token)
app.command()(bench.bench)
app.add_typer(monitoring, name="monitoring")

if __name__ == "__main__":
    app()
