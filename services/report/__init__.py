"""Report agent: composes the incident report from the other agents' typed results (ReportService)."""
