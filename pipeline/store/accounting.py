"""Every input and every planned clip of a run, with what became of it: sources.parquet and clips.parquet.

errors.parquet lists failures only; a video whose clips were all dropped by a filter appears there in no row. These
two tables close that gap: one row per input (each committed source, each duplicate file skipped, each input pattern
that matched nothing, each source still incomplete) and one row per planned clip (kept, dropped or failed, with the
stage and reason). Both are pure functions of the ledger, like the other derived outputs, so they read the same
after a resume; `why` answers "what happened to this one?" from them in one line.
"""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from pipeline.store.ledger import LedgerState

SOURCES_SCHEMA = pa.schema(
    [
        ("source", pa.string()),  # the input's path (the pattern as given for status "not_found")
        ("source_id", pa.string()),
        # curated (clips were planned), no_clips (none planned: too short, no shot long enough), rejected (failed
        # before clips), duplicate (same content as an earlier input), not_found (a pattern that matched no file),
        # incomplete (its records never all came back; the next run retries it)
        ("status", pa.string()),
        ("clips_planned", pa.int32()),
        ("clips_kept", pa.int32()),
        ("clips_dropped", pa.int32()),
        ("clips_failed", pa.int32()),
        ("samples", pa.int32()),
        ("duration_s", pa.float64()),
        # why it gave no sample (null when it gave some): "stage/reason", the most frequent among its clips
        ("reason", pa.string()),
        ("detail", pa.string()),  # all clip outcomes as "stage/reason x N, ...", or the error message
        ("run", pa.string()),
    ]
)
CLIPS_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("source_id", pa.string()),
        ("status", pa.string()),  # kept | dropped | failed
        ("stage", pa.string()),
        ("reason", pa.string()),
        ("message", pa.string()),  # a failure's message (dropped clips have none: the reason is the decision)
        ("start_s", pa.float64()),
        ("end_s", pa.float64()),
        # where its sample is: the training shard of a kept clip, or the rejects shard of a dropped clip kept as an
        # example (`s2v shards show OUT KEY` draws either)
        ("shard", pa.string()),
    ]
)


def _outcome(clip: dict) -> str:
    return f"{clip['stage']}/{clip['reason']}"


def source_rows(state: LedgerState, transient_errors: list[dict] | None = None) -> list[dict]:
    """One row per input, in path order (see SOURCES_SCHEMA)."""
    rows = []
    for entry in state.sources.values():
        clips = entry.get("clips") or []
        counts = Counter(c["status"] for c in clips)
        outcomes = Counter(_outcome(c) for c in clips if c["status"] != "kept")
        row = {
            "source": entry["path"], "source_id": entry["source_id"], "status": entry["status"],
            "clips_planned": len(clips), "clips_kept": counts["kept"], "clips_dropped": counts["dropped"],
            "clips_failed": counts["failed"], "samples": len(entry.get("samples") or []),
            "duration_s": entry.get("duration_s"), "run": entry.get("run"),
            "reason": None, "detail": ", ".join(f"{k} x{n}" for k, n in outcomes.most_common()) or None,
        }
        if entry["status"] != "curated":  # removed whole, before any clip
            row["reason"] = f"{entry.get('stage')}/{entry.get('reason')}"
            message = next((e.get("message") for e in entry.get("errors") or [] if e.get("message")), None)
            row["detail"] = message or row["detail"]
        elif not row["samples"]:
            row["reason"] = outcomes.most_common(1)[0][0] if outcomes else "no clips kept"
        rows.append(row)
    blank = {"clips_planned": 0, "clips_kept": 0, "clips_dropped": 0, "clips_failed": 0, "samples": 0}
    for entry in state.duplicates.values():
        rows.append({"source": entry["path"], "source_id": entry.get("source_id"), "status": "duplicate", **blank,
                     "reason": "probe/duplicate",
                     "detail": f"same content as {state.sources.get(entry.get('source_id'), {}).get('path')}",
                     "run": entry.get("run")})
    for entry in list(state.input_errors.values()) + list(transient_errors or []):
        status = "incomplete" if entry.get("reason") == "incomplete" else "not_found"
        rows.append({"source": entry["source"], "source_id": None, "status": status, **blank,
                     "reason": f"{entry.get('stage') or 'input'}/{entry['reason']}", "detail": entry.get("message"),
                     "run": None})
    return sorted(rows, key=lambda r: (r["source"] or "", r["status"]))


def clip_rows(state: LedgerState) -> list[dict]:
    """One row per planned clip of the committed sources, in key order (see CLIPS_SCHEMA)."""
    rows = []
    rejects = state.reject_shards()
    for entry in state.sources.values():
        shards = {**rejects, **{s["key"]: s.get("shard") for s in entry.get("samples") or []}}
        messages = {e["key"]: e.get("message") for e in entry.get("errors") or [] if e.get("key")}
        for clip in entry.get("clips") or []:
            rows.append({
                "key": clip["key"], "source": entry["path"], "source_id": entry["source_id"],
                "status": clip["status"], "stage": clip.get("stage"), "reason": clip.get("reason"),
                "message": messages.get(clip["key"]) if clip["status"] == "failed" else None,
                "start_s": clip.get("start_s"), "end_s": clip.get("end_s"), "shard": shards.get(clip["key"]),
            })
    return sorted(rows, key=lambda r: r["key"])


def _span(row: dict) -> str:
    return "" if row["start_s"] is None else f" ({row['start_s']:.2f}-{row['end_s']:.2f} s)"


def why(state: LedgerState, query: str) -> list[str]:
    """One line per input or clip that `query` names: a sample or clip key, a source id, a path, or the end of a
    path (a file name). Empty when nothing matches."""
    lines = []
    for row in clip_rows(state):
        if row["key"] == query:
            if row["status"] == "kept":
                where = f"kept in {row['shard']}"
            else:
                where = f"{row['status']} at {row['stage']}: {row['reason']}"
                where += f" ({row['message']})" if row["message"] else ""
                where += f"; an example is kept in {row['shard']}" if row["shard"] else ""
            lines.append(f"clip {row['key']} of {row['source']}{_span(row)}: {where}")
    if lines:
        return lines
    for row in source_rows(state):
        path = row["source"] or ""
        if query in (path, row["source_id"]) or path.endswith("/" + query.lstrip("/")):
            lines.append(_source_line(row))
    return lines


def _source_line(row: dict) -> str:
    head = f"{row['source']}: {row['status']}"
    if row["status"] == "curated":
        head += (f", {row['clips_planned']} clips planned, {row['clips_kept']} kept, {row['clips_dropped']} dropped, "
                 f"{row['clips_failed']} failed; {row['samples']} samples")
    if row["reason"]:
        head += f"; no sample because {row['reason']}"
    if row["detail"] and (row["status"] != "curated" or row["clips_kept"] < row["clips_planned"]):
        head += f" [{row['detail']}]"
    return head


def input_outcomes(state: LedgerState) -> dict:
    """What the stats report shows per input: counts by status, and the inputs that gave no sample with why."""
    rows = source_rows(state)
    barren = [r for r in rows if not r["samples"]]
    return {
        "inputs": len(rows),
        "by_status": dict(Counter(r["status"] for r in rows)),
        "with_samples": len(rows) - len(barren),
        "without_samples": len(barren),
        "reasons": dict(Counter(r["reason"] for r in barren).most_common()),
        "examples": [{"source": r["source"], "status": r["status"], "reason": r["reason"], "detail": r["detail"]}
                     for r in barren[:20]],
    }
