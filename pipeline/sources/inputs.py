"""Input listing: files, directories and glob patterns -> source records; optional per-video caption metadata."""

from __future__ import annotations

import fnmatch
import glob
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import UserFacingError
from pipeline.core.record import Record
from pipeline.core.storage import Entry, check_uri, is_remote, join, name, open_storage, parent
from pipeline.core.untrusted import HostileData, load_json, printable


class InputError(UserFacingError, ValueError):
    """A metadata file that cannot be used; the message names the file and line."""


def iter_inputs(patterns: list[str], extensions: list[str], problems: list[dict] | None = None) -> Iterator[Entry]:
    """Each input file once, as an Entry (its URI or absolute path, size and modification time), as the listings
    page in: local files, directories and glob patterns, and `s3://` / `gs://` objects, prefixes and patterns.

    Directories and prefixes are walked recursively for the given extensions; files named explicitly are taken
    whatever their extension (the user asked for them). A pattern that matches nothing adds an error row to
    `problems`. Only the URIs already yielded are remembered (to skip one matched twice), never a whole listing."""
    exts = {e.lower() for e in extensions}
    seen: set[str] = set()
    for pattern in patterns:
        matched = False
        for entry in _expand(pattern, exts):
            matched = True
            if entry.uri not in seen:
                seen.add(entry.uri)
                yield entry
        if not matched and not is_remote(pattern):  # an existing directory without videos is not an error
            expanded = os.path.expanduser(check_uri(pattern) if pattern.startswith("file://") else pattern)
            matched = any(os.path.exists(m) for m in (glob.glob(expanded, recursive=True)
                                                      if glob.has_magic(expanded) else [expanded]))
        if not matched and problems is not None:
            problems.append({"source": pattern, "stage": "input", "reason": "not_found",
                             "message": f"no such file or directory: {pattern}"})


def _expand(pattern: str, exts: set[str]) -> Iterator[Entry]:
    if is_remote(pattern):
        yield from _expand_remote(pattern, exts)
        return
    if pattern.startswith("file://"):
        pattern = check_uri(pattern)
    expanded = os.path.expanduser(pattern)
    matches = sorted(glob.glob(expanded, recursive=True)) if glob.has_magic(expanded) else [expanded]
    for match in matches:
        if os.path.isdir(match):
            for entry in open_storage(match).list():
                if os.path.splitext(entry.rel)[1].lower() in exts:
                    yield entry
        elif os.path.isfile(match):
            stat = os.stat(match)
            yield Entry(os.path.basename(match), os.path.abspath(match), stat.st_size, stat.st_mtime_ns)


def _expand_remote(pattern: str, exts: set[str]) -> Iterator[Entry]:
    """An object (`s3://b/v.mp4`), a prefix (`s3://b/videos`: every object below it with one of the extensions) or
    a pattern (`s3://b/videos/**/*.mp4`: listed from its fixed part, matched with fnmatch, `*` crossing '/')."""
    uri = check_uri(pattern, "--input")
    if glob.has_magic(uri):
        fixed = uri[: min(uri.find(c) for c in "*?[" if c in uri)]
        base = fixed if fixed.endswith("/") else parent(fixed) + "/"
        for entry in open_storage(base.rstrip("/"), "--input").list():
            if fnmatch.fnmatchcase(entry.uri, uri):
                yield entry
        return
    store = open_storage(parent(uri), "--input")
    single = store.info(name(uri))
    if single is not None:
        yield single
        return
    for entry in open_storage(uri, "--input").list():
        if os.path.splitext(entry.rel)[1].lower() in exts:
            yield entry


def list_inputs(patterns: list[str], extensions: list[str]) -> tuple[list[str], list[dict]]:
    """Sorted unique input paths and the problems of patterns that matched nothing (`iter_inputs`, collected)."""
    problems: list[dict] = []
    paths = sorted(entry.uri for entry in iter_inputs(patterns, extensions, problems))
    return paths, problems


def _resolved(path: str, base: str | None = None) -> str:
    """A video path as metadata and inputs are matched by: a URI as it is, a local path resolved."""
    if is_remote(path):
        return path
    if base is not None and is_remote(base):
        return join(base, path)
    return str((Path(base) / path).resolve()) if base is not None else str(Path(path).resolve())


def load_metadata(path: str) -> dict[str, dict]:
    """Read a JSONL metadata file: one object per video with `video` (path relative to the file or absolute),
    and `caption` (whole video) and/or `shots` ([{start_s, end_s, caption}]). Keyed by absolute video path (or URI:
    the file may be in object storage, and its relative paths are then relative to its prefix).

    A line that is not such an object raises InputError naming the file, the line and the problem; so does one
    nested too deep or too large to parse safely (`load_json`), or a video path that cannot be resolved (a NUL
    byte, a symbolic-link loop)."""
    uri = check_uri(path, "--metadata")
    entries: dict[str, dict] = {}
    try:
        base = parent(uri) if is_remote(uri) else str(Path(uri).resolve().parent)
        lines = open_storage(parent(uri)).read_text(name(uri)).splitlines()
    except (OSError, ValueError, RuntimeError) as exc:  # ValueError: a NUL byte; RuntimeError: a link loop (< 3.13)
        raise InputError(f"metadata file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") from None
    for number, line in enumerate(lines, 1):
        if line.strip():
            where = f"metadata file {path}, line {number}"
            entry = _metadata_entry(line, where)
            entries[_resolved_video(entry["video"], base, where)] = entry
    return entries


def _metadata_entry(line: str, where: str) -> dict:
    """One metadata line as its checked object; InputError naming `where` otherwise."""
    try:
        entry = load_json(line, where)  # bounded: a 100k-deep line is refused, not a RecursionError
    except HostileData as exc:
        raise InputError(str(exc)) from None
    if not isinstance(entry, dict) or not isinstance(entry.get("video"), str):
        raise InputError(f"{where}: expected an object with a 'video' path")
    shots = entry.get("shots") or []
    if not isinstance(shots, list):
        raise InputError(f"{where}: 'shots' is a JSON {type(shots).__name__}, not a list")
    if not isinstance(entry.get("caption") or "", str):
        raise InputError(f"{where}: 'caption' is a JSON {type(entry['caption']).__name__}, not a string")
    for shot in shots:
        ok = isinstance(shot, dict) and all(isinstance(shot.get(k), (int, float)) and not isinstance(shot.get(k), bool)
                                            for k in ("start_s", "end_s"))
        if not ok or not isinstance(shot.get("caption", ""), str):
            raise InputError(f"{where}: each shot needs numeric start_s and end_s and a caption string "
                             f"(got {printable(repr(shot))[:200]})")
    return entry


def _resolved_video(video: str, base: str, where: str) -> str:
    """`_resolved(video, base)`, or InputError naming `where` for a path no file system can hold."""
    if "\x00" in video:  # os functions raise ValueError on it; it can name no file
        raise InputError(f"{where}: video path {printable(video)[:200]} holds a NUL byte")
    try:
        return _resolved(video, base)
    except (OSError, RuntimeError, ValueError) as exc:  # a link loop: RuntimeError before Python 3.13, then OSError
        raise InputError(f"{where}: video path {printable(video)[:200]} cannot be resolved "
                         f"({printable(getattr(exc, 'strerror', None) or exc)[:200]})") from None


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


def source_records(inputs: list[str | Entry], metadata: dict[str, dict]) -> list[Record]:
    """One source record per input file (a path, or an Entry from `iter_inputs`); metadata travels with the record
    so workers need no shared state.

    Metadata matches a video by its resolved path, else by file name when that name is unique in the metadata
    (so a corpus copied elsewhere keeps its captions)."""
    names: dict[str, list[dict]] = {}
    for key, entry in metadata.items():
        names.setdefault(name(key), []).append(entry)
    records = []
    for item in inputs:
        if isinstance(item, Entry):
            path, size, mtime_ns = item.uri, item.size, item.mtime_ns
        else:
            stat = os.stat(item)
            path, size, mtime_ns = item, stat.st_size, stat.st_mtime_ns
        record = Record(kind="source", source_path=path, key="")
        record.meta["source"] = {"path": path, "size": size, "mtime_ns": mtime_ns}
        same_name = names.get(name(path), [])
        entry = metadata.get(_resolved(path)) or (same_name[0] if len(same_name) == 1 else None)
        if entry:
            record.meta["input_metadata"] = entry
        records.append(record)
    return records
