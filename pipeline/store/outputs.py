"""Derived outputs of a run, rebuilt from the ledger: index.json, manifest.parquet, errors.parquet, sources.parquet,
clips.parquet (pipeline/store/accounting.py), summary.json.

They are pure functions of the committed state, so they are the same whether a run finished in one go or was
killed and resumed, and `s2v shards stats` can compute the same summary while a job is still running.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.core.storage import Storage
from pipeline.core.storage import name as name_of
from pipeline.store.accounting import CLIPS_SCHEMA, SOURCES_SCHEMA, clip_rows, input_outcomes, source_rows
from pipeline.store.funnel import Funnel, recorded_order
from pipeline.store.ledger import LedgerState, as_storage

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("source", pa.string()),
        ("source_id", pa.string()),
        ("clip_id", pa.string()),
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        ("fps", pa.float64()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("num_frames", pa.int32()),
        ("duration_s", pa.float64()),
        ("caption", pa.string()),
        ("brightness", pa.float64()),
        ("sharpness", pa.float64()),
        ("entities", pa.int32()),
        ("subjects", pa.int32()),
        ("faces", pa.int32()),
        ("frontal_faces", pa.int32()),
        ("clip_alignment", pa.float64()),
        ("cross_base", pa.string()),  # cross-paired samples: the own sample they were made from
        ("cross_kinds", pa.string()),  # and how their references were swapped (JSON counts)
    ]
)
ERRORS_SCHEMA = pa.schema(
    [("source", pa.string()), ("key", pa.string()), ("stage", pa.string()), ("reason", pa.string()),
     ("message", pa.string())]
)


def _write_json(out: Storage, name: str, body: dict) -> None:
    out.write_text(name, json.dumps(body, indent=2))  # atomic: renamed into place, or one put


def _write_table(out: Storage, name: str, table: pa.Table) -> None:
    with out.open_write(name) as f:
        pq.write_table(table, f)


def _input_errors(state: LedgerState, transient: list[dict] | None) -> list[dict]:
    return list(state.input_errors.values()) + list(transient or [])


def summarize(state: LedgerState, transient_errors: list[dict] | None = None, order: list[str] | None = None) -> dict:
    """Funnel (per stage and unit: how many went in, came out, and were removed for which reason), totals and
    the throughput of each run. Source-level removals come first: a source removed whole never planned clips.
    `order`: the flow's stage order (default: the one the runs recorded)."""
    funnel = Funnel()
    video_s = 0.0
    variants, requested, rejected, instances = Counter(), Counter(), Counter(), Counter()
    for entry in state.sources.values():
        funnel.add(entry)
        video_s += entry.get("duration_s") or 0.0
        if entry["status"] != "curated":
            continue
        for clip in entry["clips"]:
            if clip["status"] != "kept":
                continue
            variants.update(clip.get("variants") or {})
            requested.update(clip.get("requested") or {})
            counts = clip.get("instances")
            if counts:
                instances["total"] += counts["total"]
                instances["valid"] += counts["valid"]
                rejected.update(counts["rejected"])
    input_errors = _input_errors(state, transient_errors)
    funnel.input_removed.update([e["reason"] for e in input_errors] + ["duplicate"] * len(state.duplicates))

    kept_s = sum(s["duration_s"] for e in state.sources.values() for s in e["samples"])
    runs = [dict(r) for r in state.runs]
    return {
        "sources": funnel.sources,
        "duplicates": len(state.duplicates),
        "clips": funnel.clips,
        "samples": funnel.samples,
        "shards": len(state.shards),
        "bytes": sum(s["bytes"] for s in state.shards.values()),
        "input_video_hours": video_s / 3600,
        "sample_video_hours": kept_s / 3600,
        "funnel": funnel.rows(order or recorded_order(state.runs)),
        # Of the kept samples: instances and their filter reasons, and the reference variant mix (what was asked
        # by the ratio, and what was made once unavailable variants were drawn again).
        "instances": {**instances, "rejected": dict(rejected)} if instances else None,
        "references": {
            "total": sum(variants.values()),
            "variants": dict(variants),
            "shares": {v: round(n / sum(variants.values()), 4) for v, n in variants.items()},
            "requested": dict(requested),
        } if variants else None,
        # Own counts above (samples, shards, bytes, funnel); the cross-paired set carries its own.
        "cross_pairs": cross_summary(state),
        "inputs": input_outcomes(state),
        "runs": runs,
        "last_run": runs[-1] if runs else None,
    }


def write_outputs(out_dir: str | Path, state: LedgerState, transient_errors: list[dict] | None = None) -> dict:
    """Rebuild every derived file from the committed state; `transient_errors` are this run's problems that are
    not committed (sources whose records never all came back; the next run retries them)."""
    out = as_storage(out_dir)
    shards = sorted(list(state.shards.values()) + (state.cross or {}).get("shards", []), key=lambda e: e["shard"])
    index = {
        # wids reads this layout ("shardlist" of {url, nsamples}); urls are relative to this file.
        "__kind__": "wids-shard-index-v1",
        "wids_version": 1,
        "name": name_of(out.uri),
        "shardlist": [
            {"url": e["shard"], "nsamples": e["nsamples"], "filesize": e["bytes"], "sha256": e["sha256"]}
            for e in shards
        ],
        "total_samples": sum(e["nsamples"] for e in shards),
    }
    _write_json(out, "index.json", index)

    own = [s for e in state.sources.values() for s in e["samples"]]
    rows = sorted(own + cross_manifest_rows(state), key=lambda r: r["key"])
    table = pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)
    _write_table(out, "manifest.parquet", table)

    errors = _input_errors(state, transient_errors) + [e for entry in state.sources.values() for e in entry["errors"]]
    errors_table = pa.Table.from_pylist(
        [{name: e.get(name) for name in ERRORS_SCHEMA.names} for e in errors], schema=ERRORS_SCHEMA
    )
    _write_table(out, "errors.parquet", errors_table)
    for name, rows, schema in (("sources", source_rows(state, transient_errors), SOURCES_SCHEMA),
                               ("clips", clip_rows(state), CLIPS_SCHEMA)):
        _write_table(out, f"{name}.parquet", pa.Table.from_pylist(rows, schema=schema))

    return write_summary(out, state, transient_errors)


def write_summary(out_dir: str | Path, state: LedgerState, transient_errors: list[dict] | None = None,
                  progress: dict | None = None, order: list[str] | None = None) -> dict:
    """summary.json alone: with `progress` while a run is going (status "running"), else the final one. `order`:
    the running flow's stage order, before its run line records it."""
    summary = {"status": "running" if progress else "finished", **summarize(state, transient_errors, order)}
    if progress:
        summary["progress"] = progress
    _write_json(as_storage(out_dir), "summary.json", summary)
    return summary


def cross_summary(state: LedgerState) -> dict | None:
    """summary.json's "cross_pairs": None when no cross pass ran yet."""
    entry = state.cross
    if entry is None:
        return None
    return {
        "samples": len(entry["samples"]),
        "share": entry["share"],
        "target": entry["target"],
        "kinds": entry["kinds"],
        "shards": len(entry["shards"]),
        "bytes": sum(s["bytes"] for s in entry["shards"]),
        **{k: v for k, v in entry.get("info", {}).items() if k in ("capped", "note", "reason", "shortfall", "skipped")},
    }


def cross_manifest_rows(state: LedgerState) -> list[dict]:
    """Manifest rows of the cross samples: the base's row with the cross key and shard, plus `cross_base` and
    `cross_kinds` (a JSON string), so one table describes own and cross samples alike."""
    if state.cross is None:
        return []
    base_rows = {row["key"]: row for entry in state.sources.values() for row in entry.get("samples", [])}
    rows = []
    for row in state.cross["samples"]:
        base = base_rows.get(row["base"], {})
        rows.append({**base, "key": row["key"], "shard": row["shard"], "cross_base": row["base"],
                     "cross_kinds": json.dumps(row["kinds"], sort_keys=True)})
    return rows
