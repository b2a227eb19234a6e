"""Benchmark suites of `copilot bench` (mesh, vision, retrieval, soak) and stand-alone measurements. They print
a table and write JSON; no test asserts their figures."""
