"""Shared benchmark plumbing: machine description, timing, JSON + Markdown output."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

from cdretrieval import __version__
from cdretrieval.io import atomic_write_json, atomic_write_text

RESULTS = Path(__file__).resolve().parent / "results"

T = TypeVar("T")


# --------------------------------------------------------------------------------------------- timing


def sync(device: torch.device | None) -> None:
    """Wait for queued GPU work (a no-op on CPU or None) so wall-clock times cover it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], T], device: torch.device | None = None) -> tuple[float, T]:
    """``(seconds, result)`` of one call of ``fn``, queued work on ``device`` included."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def timed(fn: Callable[[], object], device: torch.device | None = None) -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    return timed_call(fn, device)[0]


def interleaved(
    variants: Mapping[str, Callable[[], object]], repeats: int, device: torch.device | None = None, warmup: int = 1
) -> dict[str, list[float]]:
    """Run every variant once per round for ``repeats`` rounds (after ``warmup`` untimed rounds); seconds per
    call. Interleaving spreads a loaded machine's slow spells over every variant instead of one."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn, device))
    return times


def medians(times: Mapping[str, Sequence[float]]) -> dict[str, float]:
    """The median of each variant's times."""
    return {name: statistics.median(ts) for name, ts in times.items()}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cdretrieval": __version__,
    }
    try:
        info["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = None
    return info


def _path_prefixes() -> list[tuple[str, str]]:
    """Machine-specific path prefixes and what results say instead (longest first)."""
    from cdretrieval.paths import cache_dir

    repo = Path(__file__).resolve().parents[1]
    pairs = [
        (str(cache_dir().resolve()), "$CDRETRIEVAL_CACHE"),
        (str(repo), "."),
        (str(repo.parent), ".."),
        (str(Path.home()), "~"),
    ]
    return sorted(pairs, key=lambda p: len(p[0]), reverse=True)


def portable(obj: Any, prefixes: list[tuple[str, str]] | None = None) -> Any:
    """``obj`` with absolute paths of this machine rewritten (cache → ``$CDRETRIEVAL_CACHE``, the repository →
    ``.``, its parent → ``..``, home → ``~``), so committed results name no machine's folders."""
    prefixes = _path_prefixes() if prefixes is None else prefixes
    if isinstance(obj, str):
        for prefix, short in prefixes:
            obj = obj.replace(prefix, short)
        return obj
    if isinstance(obj, dict):
        return {k: portable(v, prefixes) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [portable(v, prefixes) for v in obj]
    return obj


def write_outputs(name: str, payload: dict[str, Any], table: str, out_dir: Path | None = None) -> Path:
    """Write ``<name>.json`` and ``<name>.md`` (the table) under ``out_dir``, with portable paths; print the table."""
    folder = out_dir or RESULTS
    payload = portable({"benchmark": name, "created": dt.datetime.now(dt.timezone.utc).isoformat(),
                        "machine": machine(), **payload})
    table = portable(table)
    atomic_write_json(folder / f"{name}.json", payload)
    atomic_write_text(folder / f"{name}.md", table + "\n")
    print(table)
    print(f"\nwrote {folder / (name + '.json')}")
    return folder / f"{name}.json"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right_align: bool = False) -> str:
    """A Markdown table; floats with 3 decimals. ``right_align``: every column but the first right-aligned
    (columns of numbers)."""
    def fmt(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    rule = ["---"] + ["---:" if right_align else "---"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2)
