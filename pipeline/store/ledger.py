"""The commit log of an output directory (OUT/ledger.jsonl): the single source of truth for resume.

Entries are appended and fsynced in commit order, one JSON object per line:
  {"type": "shard", "shard": "shards/train-000003.tar", "nsamples", "bytes", "sha256", "keys": [...],
   "sources": [<source entry>, ...]}                  -- the sources whose last sample is in this shard
  {"type": "source", "path", "source_id", "size", "mtime_ns", "status", "samples": [...], "clips": [...],
   "errors": [...]}                                   -- a source without samples (rejected, all dropped)
A shard and the sources it completes commit in one line, so no crash can leave a committed shard holding a
sample whose source the next run would redo.
  {"type": "duplicate", "path", "source_id", ...}   -- a file whose content an earlier source already had
  {"type": "input_error", "source", "reason", ...}  -- an input pattern that matched nothing
  {"type": "rejects", "shard": "rejects/rejects-000000.tar", "keys": [...], "reasons": {key: "stage/reason"}}
                                                      -- examples of dropped clips (output.rejects_per_reason); never
                                                         training data, not in index.json
  {"type": "run", ...}                                -- one per finished run: wall time and throughput
  {"type": "cross", "own_digest", "shards": [...], "samples": [...], ...}
                                                      -- the cross-pair set (pipeline/postpass/cross_pairs.py); the last
                                                         one is current and its shards replace every earlier one's
A source is committed when its entry is in the log. Everything else on disk (temporary shards, shards without
an entry, shards that hold only samples of uncommitted sources, samples staged by workers) is debris of an
interrupted run and is removed by `recover()` before a run starts, so a rerun neither duplicates nor loses a sample.

Where the log lives depends on the output's storage (pipeline/core/storage.py):
- a POSIX directory: `ledger.jsonl`, appended line by line, each append fsynced;
- an object store (no append, no rename): `ledger/NNNNNNNNNNNN.jsonl`, one object per commit holding all its lines,
  numbered in commit order. A put is atomic, so a commit is there whole or not at all, and a commit of several
  lines (shards and the sources they complete) can never be torn.
"""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.names import check_shard
from pipeline.core.storage import Storage, open_storage
from pipeline.core.untrusted import MB, HostileData, load_json, read_limits

log = logging.getLogger(__name__)

LEDGER_NAME = "ledger.jsonl"
SEGMENT_DIR = "ledger"  # the log on an object store: one object per commit
_SEGMENT = re.compile(rf"{SEGMENT_DIR}/\d{{12}}\.jsonl")
SHARD_DIR = "shards"
REJECTS_DIR = "rejects"  # examples of dropped clips, apart from the training shards
# Samples written by the workers, waiting for their source to complete and be assembled into a shard
# (pipeline/store/shards.py): scratch, never part of the output.
STAGING_DIR = ".staging"
SPOOL_DIR = ".spool"  # the driver-side spool of earlier versions: removed as debris


@dataclass
class LedgerState:
    shards: dict[str, dict] = field(default_factory=dict)  # shard path (relative to OUT) -> entry
    sources: dict[str, dict] = field(default_factory=dict)  # source_id -> entry
    runs: list[dict] = field(default_factory=list)
    duplicates: dict[str, dict] = field(default_factory=dict)  # path -> entry of a file whose content came before
    input_errors: dict[tuple[str, str], dict] = field(default_factory=dict)  # (pattern, reason) -> entry
    # the last "cross" entry: the current cross-pair shards (pipeline/postpass/cross_pairs.py)
    cross: dict | None = None
    rejects: dict[str, dict] = field(default_factory=dict)  # rejects shard path -> entry

    def reject_shards(self) -> dict[str, str]:
        """Key of each kept example of a dropped clip -> its rejects shard."""
        return {key: shard for shard, e in self.rejects.items() for key in e["keys"]}

    def cross_shards(self) -> set[str]:
        """Shard paths (relative to OUT) of the current cross-pair set."""
        return {s["shard"] for s in self.cross["shards"]} if self.cross else set()

    def committed_files(self) -> dict[tuple[str, int, int], str]:
        """(path, size, mtime_ns) -> source id: lets a rerun skip unchanged files without hashing them."""
        entries = list(self.sources.values()) + list(self.duplicates.values())
        return {(e["path"], e["size"], e["mtime_ns"]): e["source_id"] for e in entries}


def as_storage(out: str | Path | Storage) -> Storage:
    """An output directory: opened strict (no links followed, regular files only; pipeline/core/storage.py)."""
    return out if isinstance(out, Storage) else open_storage(out, "output", strict=True)


class Ledger:
    def __init__(self, out_dir: str | Path | Storage):
        self.storage = as_storage(out_dir)
        self.remote = self.storage.remote
        self.out_dir = self.storage.local_path()  # None on an object store
        self.path = self.out_dir / LEDGER_NAME if self.out_dir is not None else None
        self._next_segment: int | None = None

    @property
    def name(self) -> str:
        """What the log is called in messages: ledger.jsonl, or ledger/ on an object store."""
        return f"{SEGMENT_DIR}/" if self.remote else LEDGER_NAME

    def exists(self) -> bool:
        """Has anything been committed here?"""
        if self.remote:
            return next(self.storage.list(SEGMENT_DIR), None) is not None
        return self.storage.info(LEDGER_NAME) is not None

    def lines(self) -> list[str]:
        """The log's lines in commit order. A line longer than the read limit (`max_json_mb`, pipeline/core/
        untrusted.py) is no line this project writes: it is left out (a ledger.jsonl that is a link or a device is
        refused by the strict output storage before anything is read)."""
        cap = int(read_limits().max_json_mb * MB)
        if not self.remote:
            if self.storage.info(LEDGER_NAME) is None:
                return []
            lines = []
            with self.storage.open_read(LEDGER_NAME) as f:
                while line := f.readline(cap + 1):
                    if len(line) > cap:  # the rest of an over-long line, read and dropped in bounded pieces
                        while line and not line.endswith(b"\n"):
                            line = f.readline(cap + 1)
                        log.warning("%s: a line over %d bytes left out", self.name, cap)
                        continue
                    lines.append(line.decode("utf-8", "replace").rstrip("\n"))
            return lines
        names = self._segments()
        if names:
            self._next_segment = max(self._next_segment or 0, _segment_number(names[-1]) + 1)
        with ThreadPoolExecutor(8) as pool:  # one request each: in parallel, or a long log reads slowly
            texts = list(pool.map(lambda n: self.storage.read_text(n, cap), names))
        return [line for text in texts for line in text.splitlines()]

    def _segments(self) -> list[str]:
        """The commit objects in commit order; anything else under ledger/ is not ours and is ignored."""
        return sorted(e.rel for e in self.storage.list(SEGMENT_DIR) if _SEGMENT.fullmatch(e.rel))

    def read(self) -> LedgerState:
        """Parse the log; a torn last line (killed mid-append) is ignored: its commit never happened. A line that is
        not an entry this project writes (a foreign or damaged log) is left out with a warning."""
        state = LedgerState()
        bad = 0
        for line in self.lines():
            try:
                entry = load_json(line, self.name)
            except HostileData:
                continue  # torn
            if not _well_formed(entry):
                bad += 1
                continue
            kind = entry.get("type")
            if kind == "shard":
                state.shards[entry["shard"]] = entry
                for source in entry.get("sources", []):
                    state.sources[source["source_id"]] = source
            elif kind == "source":
                state.sources[entry["source_id"]] = entry
            elif kind == "input_error":
                state.input_errors[(entry["source"], entry["reason"])] = entry
            elif kind == "duplicate":
                state.duplicates[entry["path"]] = entry
            elif kind == "run":
                state.runs.append(entry)
            elif kind == "cross":
                state.cross = entry
            elif kind == "rejects":
                state.rejects[entry["shard"]] = entry
        if bad:
            log.warning("%s: %d lines are not ledger entries of this project; left out", self.name, bad)
        return state

    def append(self, entry: dict) -> None:
        self.append_many([entry])

    def append_many(self, entries: list[dict]) -> None:
        """Commit `entries` together: one fsynced append on POSIX (a crash can tear it only at its end, and
        `recover` then drops shards whose sources did not commit), one object on an object store."""
        if not entries:
            return
        text = "".join(json.dumps(entry, separators=(",", ":")) + "\n" for entry in entries)
        if self.remote:
            if self._next_segment is None:
                self._next_segment = max((_segment_number(n) + 1 for n in self._segments()), default=0)
            self.storage.write_text(f"{SEGMENT_DIR}/{self._next_segment:012d}.jsonl", text)
            self._next_segment += 1
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.storage.checked_path(LEDGER_NAME), "a") as f:  # never appends through a link
            # A torn line from a killed writer must not swallow this entry: start on a fresh line.
            if f.tell() > 0 and not self._ends_with_newline():
                f.write("\n")
            f.write(text)
            f.flush()
            os.fsync(f.fileno())

    def _ends_with_newline(self) -> bool:
        with self.storage.open_read(LEDGER_NAME) as f:
            f.seek(-1, os.SEEK_END)
            return f.read(1) == b"\n"

    def recover(self) -> LedgerState:
        """Remove the debris of an interrupted run and return the committed state."""
        state = self.read()
        committed_keys = {s["key"] for e in state.sources.values() for s in e["samples"]}
        orphaned = [name for name, e in state.shards.items() if not committed_keys.intersection(e["keys"])]
        for name in orphaned:
            # A commit of several lines torn after its shard lines (POSIX only: an object-store commit is one put):
            # the source those shards hold never committed.
            self.storage.delete(check_shard(name, self.storage))  # a ledger line never deletes outside shards/
            del state.shards[name]
        # Cross shards named by no current cross line are debris too: written before a crash kept their line from
        # committing, or superseded by a later line before the old files were deleted. A rejects shard is
        # committed by its own line, after it was published.
        keep = set(state.shards) | state.cross_shards() | set(state.rejects)
        for directory in (SHARD_DIR, REJECTS_DIR):
            for entry in self.storage.list(directory):
                if entry.rel not in keep:
                    self.storage.delete(entry.rel)
        for scratch in (STAGING_DIR, SPOOL_DIR):  # samples of sources a crash left half-arrived
            self.storage.delete_tree(scratch)
        if not self.remote and (orphaned or self._has_torn_line()):
            self._rewrite(set(orphaned))
        return state

    def _has_torn_line(self) -> bool:
        entry = self.storage.info(LEDGER_NAME)
        return entry is not None and entry.size > 0 and not self._ends_with_newline()

    def _rewrite(self, drop_shards: set[str]) -> None:
        """Rewrite the log without torn lines and without the entries of removed shards."""
        kept = []
        for line in self.lines():
            try:
                entry = load_json(line, self.name)
            except HostileData:
                continue
            if entry.get("type") == "shard" and entry["shard"] in drop_shards:
                continue
            kept.append(line + "\n")
        tmp = self.storage.checked_path(LEDGER_NAME + ".tmp")
        with open(tmp, "w") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


def _is(value, kind) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def _well_formed_source(source) -> bool:
    return (isinstance(source, dict) and _is(source.get("source_id"), str) and _is(source.get("path"), str)
            and _is(source.get("samples", []), list)
            and all(isinstance(r, dict) and _is(r.get("key"), str) for r in source.get("samples", [])))


def _well_formed(entry) -> bool:
    """The fields the readers of the log rely on have their types (a foreign log is checked, not trusted)."""
    if not isinstance(entry, dict):
        return False
    kind = entry.get("type")
    if kind in ("shard", "rejects"):
        ok = (_is(entry.get("shard"), str) and _is(entry.get("keys", []), list)
              and all(_is(k, str) for k in entry.get("keys", [])))
        if kind == "shard":
            ok = ok and _is(entry.get("sources", []), list) and all(map(_well_formed_source, entry.get("sources", [])))
        return ok
    if kind == "source":
        return _well_formed_source(entry)
    if kind == "input_error":
        return _is(entry.get("source"), str) and _is(entry.get("reason"), str)
    if kind == "duplicate":
        return _is(entry.get("path"), str) and _is(entry.get("source_id"), str)
    if kind == "cross":
        return (_is(entry.get("shards", []), list) and _is(entry.get("samples", []), list)
                and all(isinstance(s, dict) and _is(s.get("shard"), str) for s in entry.get("shards", [])))
    return True


def _segment_number(rel: str) -> int:
    return int(rel.rsplit("/", 1)[-1].split(".")[0])


def own_sample_shards(state: LedgerState) -> dict[str, str]:
    """Committed own sample key -> its shard (relative to OUT)."""
    return {row["key"]: row["shard"] for entry in state.sources.values() for row in entry.get("samples", [])
            if row.get("shard") in state.shards}
