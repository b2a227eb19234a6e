"""Benchmark entry point (same as `copilot bench`): prints a table and writes benchmarks/results/*.json."""
from copilot.cli import app

if __name__ == "__main__":
    app(["bench", *__import__("sys").argv[1:]])
