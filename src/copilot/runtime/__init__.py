"""Shared runtime written once for every service: config, logging, telemetry, server bootstrap,
interceptors, client channels and proto <-> domain conversion."""
