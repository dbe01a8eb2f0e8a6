"""Input listing: files, directories and glob patterns -> source records; optional per-video caption metadata."""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

from pipeline.core.errors import UserFacingError
from pipeline.core.record import Record


class InputError(UserFacingError, ValueError):
    """A metadata file that cannot be used; the message names the file and line."""


def list_inputs(patterns: list[str], extensions: list[str]) -> tuple[list[str], list[dict]]:
    """Expand patterns into sorted unique absolute file paths.

    Directories are walked recursively for the given extensions; files named explicitly are taken whatever
    their extension (the user asked for them). Returns (paths, problems) where each problem is an error row for
    a pattern that matched nothing.
    """
    exts = {e.lower() for e in extensions}
    found: set[str] = set()
    problems: list[dict] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
        if not matches or not any(os.path.exists(m) for m in matches):
            problems.append(
                {"source": pattern, "stage": "input", "reason": "not_found",
                 "message": f"no such file or directory: {pattern}"}
            )
            continue
        for match in matches:
            if os.path.isdir(match):
                for root, _dirs, files in os.walk(match):
                    found.update(os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in exts)
            elif os.path.isfile(match):
                found.add(match)
    return sorted(os.path.abspath(p) for p in found), problems


def load_metadata(path: str) -> dict[str, dict]:
    """Read a JSONL metadata file: one object per video with `video` (path relative to the file or absolute),
    and `caption` (whole video) and/or `shots` ([{start_s, end_s, caption}]). Keyed by absolute video path."""
    base = Path(path).resolve().parent
    entries: dict[str, dict] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise InputError(f"metadata file {path}: cannot read it ({exc.strerror})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"metadata file {path}, line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(entry, dict) or not isinstance(entry.get("video"), str):
            raise InputError(f"metadata file {path}, line {number}: expected an object with a 'video' path")
        for shot in entry.get("shots") or []:
            ok = isinstance(shot, dict) and all(isinstance(shot.get(k), (int, float)) for k in ("start_s", "end_s"))
            if not ok or not isinstance(shot.get("caption", ""), str):
                raise InputError(
                    f"metadata file {path}, line {number}: each shot needs numeric start_s and end_s and a caption "
                    f"string (got {shot!r})"
                )
        entries[str((base / entry["video"]).resolve())] = entry
    return entries


def caption_for_span(entry: dict | None, start_s: float, end_s: float) -> dict | None:
    """The metadata caption that best covers [start_s, end_s]: the shot with most overlap, else the video's."""
    if not entry:
        return None
    best, best_overlap = None, 0.0
    for shot in entry.get("shots") or []:
        overlap = min(end_s, float(shot["end_s"])) - max(start_s, float(shot["start_s"]))
        if overlap > best_overlap and shot.get("caption"):
            best, best_overlap = shot["caption"], overlap
    if best is None:
        best = entry.get("caption")
    return {"text": best, "source": "metadata"} if best else None


def source_records(paths: list[str], metadata: dict[str, dict]) -> list[Record]:
    """One source record per input file; metadata travels with the record so workers need no shared state.

    Metadata matches a video by its resolved path, else by file name when that name is unique in the metadata
    (so a corpus copied elsewhere keeps its captions)."""
    names: dict[str, list[dict]] = {}
    for key, entry in metadata.items():
        names.setdefault(Path(key).name, []).append(entry)
    records = []
    for path in paths:
        stat = os.stat(path)
        record = Record(kind="source", source_path=path, key="")
        record.meta["source"] = {"path": path, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        same_name = names.get(Path(path).name, [])
        entry = metadata.get(str(Path(path).resolve())) or (same_name[0] if len(same_name) == 1 else None)
        if entry:
            record.meta["input_metadata"] = entry
        records.append(record)
    return records
