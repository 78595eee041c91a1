"""Where the benchmarks keep their JSON summaries: ``benchmarks/results/<name>.json`` (git-ignored)."""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def save(name: str, summary: dict, path: Path | None = None) -> Path:
    """Write ``summary`` to ``path``, by default ``results/<name>.json`` (the folder is created on
    first use); returns where it went."""
    if path is None:
        RESULTS.mkdir(exist_ok=True)
        path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(summary, indent=1, default=float))
    return path
