"""The `copilot` command line: the local mesh, diagnoses, history, knowledge, tokens and benchmarks. It sits
above the shared library (`copilot`) and the services; nothing below imports it."""
