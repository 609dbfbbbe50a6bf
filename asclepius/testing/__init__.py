"""Tools for tests and benchmarks (not the product): a local OpenAI-compatible server with limits and faults."""

from pathlib import Path


def published(run_dir, *parts: str) -> Path:
    """A file or folder of a run's published output (the version its manifest points to), as a local path."""
    from asclepius.run import RunDir

    return Path(RunDir.open(str(run_dir)).output_path(*parts))
