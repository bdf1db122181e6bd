"""Where a sink writes: its path template filled in for a run and a rank."""

from __future__ import annotations

from pathlib import Path


def rank_path(template: str, run: str, rank: int | None, directory: bool) -> str:
    """A sink's path from its template: ``{run}`` and ``{rank}`` filled in. With a per-rank
    ``rank`` and no ``{rank}`` in the template, the rank gets its own ``rank<N>`` directory:
    ``runs/r/actmon.db`` -> ``runs/r/rank1/actmon.db`` (a file), ``runs/r/tensorboard`` ->
    ``runs/r/tensorboard/rank1`` (a directory), so ranks never write to one file."""
    path = template.format(run=run, rank=0 if rank is None else rank)
    if rank is None or "{rank}" in template:
        return path
    p = Path(path)
    return str(p / f"rank{rank}" if directory else p.parent / f"rank{rank}" / p.name)
