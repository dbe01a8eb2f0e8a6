"""`s2v shards stats`: counts, the drop funnel and clip durations of one or more output directories.

Reads the ledger, not summary.json, so it also works while a job is still writing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from pipeline.ledger import Ledger
from pipeline.outputs import summarize


class StatsError(ValueError):
    pass


def shard_stats(out_dir: str | Path) -> dict:
    out = Path(out_dir)
    if not (out / "ledger.jsonl").exists():
        raise StatsError(f"{out}: no ledger.jsonl here; is it the --output directory of an `s2v curate run`?")
    state = Ledger(out).read()
    summary = summarize(state)
    durations = np.array([s["duration_s"] for e in state.sources.values() for s in e["samples"]], dtype=float)
    summary["durations_s"] = (
        {"min": float(durations.min()), "mean": float(durations.mean()), "max": float(durations.max()),
         "histogram": _histogram(durations)}
        if durations.size else {"min": None, "mean": None, "max": None, "histogram": []}
    )
    summary["out_dir"] = str(out)
    return summary


def _histogram(values: np.ndarray, bins: int = 8) -> list[dict]:
    counts, edges = np.histogram(values, bins=bins)
    return [{"from": float(a), "to": float(b), "count": int(c)} for a, b, c in zip(edges[:-1], edges[1:], counts)]


def print_stats(summary: dict, console: Console) -> None:
    totals = Table(title=f"Shards in {summary['out_dir']}", show_header=False)
    last = summary.get("last_run") or {}
    rows = [
        ("sources committed", summary["sources"]),
        ("duplicate inputs skipped", summary["duplicates"]),
        ("clips planned", summary["clips"]),
        ("samples", summary["samples"]),
        ("shards", f"{summary['shards']} ({summary['bytes'] / 1e6:.1f} MB)"),
        ("input video", f"{summary['input_video_hours'] * 60:.1f} min"),
        ("sample video", f"{summary['sample_video_hours'] * 60:.1f} min"),
    ]
    if last:
        rows += [
            ("last run wall time", f"{last['wall_s']:.1f} s ({last['mode']}, {last['cpus']:.0f} CPUs)"),
            ("last run clips/s", f"{last['clips_per_s']:.2f}"),
            ("video-hours/day/core", f"{last['video_hours_per_day_per_core']:.1f}"),
        ]
    cross = summary.get("cross_pairs")
    if cross is not None:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted((cross.get("kinds") or {}).items())) or "-"
        rows.append(("cross-paired samples", f"{cross['samples']} (share {100 * cross['share']:.1f} %, "
                                             f"target {cross['target']}; references: {kinds})"))
    for name, value in rows:
        totals.add_row(name, str(value))
    console.print(totals)

    funnel = Table(title="Funnel")
    for column in ("stage", "unit", "in", "out", "removed (reason: count)"):
        funnel.add_column(column, justify="right" if column in ("in", "out") else "left")
    for step in summary["funnel"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(step["removed"].items())) or "-"
        funnel.add_row(step["stage"], step["unit"], str(step["in"]), str(step["out"]), reasons)
    console.print(funnel)

    refs = summary.get("references")
    if refs:
        mix = Table(title=f"Reference variants ({refs['total']} references in the samples)")
        for column in ("variant", "references", "share", "drawn by the ratio"):
            mix.add_column(column, justify="left" if column == "variant" else "right")
        for variant in ("crop", "segment", "inpaint", "redux"):
            made, asked = refs["variants"].get(variant, 0), refs["requested"].get(variant, 0)
            if made or asked:
                note = "" if made or not asked else " (unavailable)"
                mix.add_row(variant, str(made), f"{100 * refs['shares'].get(variant, 0):.1f} %", f"{asked}{note}")
        console.print(mix)
    instances = summary.get("instances")
    if instances:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(instances["rejected"].items())) or "-"
        console.print(f"Instances in the samples: {instances['valid']} valid of {instances['total']}; "
                      f"invalid by reason: {reasons}")

    d = summary["durations_s"]
    if d["histogram"]:
        hist = Table(title=f"Clip durations (s): min {d['min']:.2f}, mean {d['mean']:.2f}, max {d['max']:.2f}")
        hist.add_column("seconds")
        hist.add_column("clips", justify="right")
        hist.add_column("")
        peak = max(b["count"] for b in d["histogram"]) or 1
        for b in d["histogram"]:
            hist.add_row(f"{b['from']:.2f}-{b['to']:.2f}", str(b["count"]), "#" * round(30 * b["count"] / peak))
        console.print(hist)
