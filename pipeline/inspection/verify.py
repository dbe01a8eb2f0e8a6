"""`s2v shards verify`: prove that an output directory is what its index, manifest and ledger say it is.

Per shard listed in index.json (own and cross-pair shards alike):
- its url is a string `shards/NAME.tar` (any other is reported and never opened: pipeline/core/names.py);
- the file exists and is a regular file (not a link, FIFO or device: `unsafe_file`), its size and sha256 match
  index.json;
- its tar structure is whole and ours, by the one shard reader's checks (pipeline/store/shards.py `iter_members`:
  not compressed, regular non-sparse members within the file and under their size caps, KEY.PART names), and the
  end-of-archive blocks are there (a tar cut at a member boundary reads "fine" as a shorter archive);
- only then, upstream webdataset reads it end to end (its own tar expander and key grouping, fed the file through a
  hashing reader so each shard is read once), with the sample count index.json gives. A shard whose structure
  failed is only hashed: nothing is ever inflated.
Per sample: a plain key and plain member names (no path separators, no '..'); KEY.mp4 and KEY.json; KEY.json
parses within the read limits, passes the schema (pipeline/store/sample_meta.py) and names its own key; every file
it names is there (references' `file` and `mask`, `background.file`), KEY.faces.npy exactly when it lists faces
(one row per face), and KEY.dmask{i}.png for every detection when segmentation ran; no other members; no key twice
in the run.
Across files: manifest.parquet has exactly the shards' keys, each row naming the shard the sample is in (read in
batches; a manifest declaring far more rows than there are samples is reported from its footer, unread); the
ledger's shard entries and its current cross-pair entry agree with index.json (nsamples, bytes, sha256, keys);
index.json's total is the sum of its shards.

A run still writing (or killed and not yet resumed) fails verify: index.json then describes the last finished run
while the ledger and shards/ hold more. That is the truth about the directory at that moment.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.text import Text
from webdataset.tariterators import group_by_keys, tar_file_expander

from pipeline.core.errors import UserFacingError
from pipeline.core.names import CROSS_PREFIX, KEY_SUFFIX, UnsafeName, check_key, check_part, check_shard
from pipeline.core.storage import Storage, UnsafeFile
from pipeline.core.untrusted import MB, HostileData, load_json, load_npy, printable, read_limits
from pipeline.store.ledger import REJECTS_DIR, SHARD_DIR, Ledger, as_storage
from pipeline.store.sample_meta import parse_sample_meta
from pipeline.store.shards import TMP_SUFFIX, ShardError, iter_members

BLOCK = 512  # tar block size
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
DMASK = re.compile(r"dmask(\d+)\.png")


@dataclass(frozen=True)
class Problem:
    """One thing wrong. `what` is a short stable code (`sha256_mismatch`, `missing_part`, ...); `shard` is relative
    to the output directory; `key` is set for problems of one sample."""

    what: str
    detail: str
    shard: str | None = None
    key: str | None = None

    def __str__(self) -> str:
        where = " ".join(p for p in (self.shard, self.key) if p)
        return f"{self.what}: {where + ': ' if where else ''}{self.detail}"


@dataclass
class Verification:
    """What verify looked at, and what it found wrong."""

    out_dir: str
    shards: int = 0
    samples: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"out_dir": self.out_dir, "ok": self.ok, "shards": self.shards, "samples": self.samples,
                "bytes": self.bytes, "problems": [asdict(p) for p in self.problems]}

    def summary_line(self) -> str:
        state = "OK" if self.ok else f"{len(self.problems)} problems"
        return (f"{self.out_dir}: {state}: {self.shards} shards, {self.samples} samples, "
                f"{self.bytes / 1e6:.1f} MB checked")


@dataclass
class _ShardContent:
    """What one shard holds, as upstream webdataset grouped it."""

    keys: list[str] = field(default_factory=list)
    sha256: str = ""
    readable: bool = True
    size: int = 0


class _HashingReader(io.RawIOBase):
    """A read-only file that hashes every byte handed out: the webdataset pass and the checksum share one read."""

    def __init__(self, f):
        self._f = f
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = self._f.readinto(buffer)
        if n:
            self.digest.update(memoryview(buffer)[:n])
        return n


def verify(out_dir: str | Path, console: Console | None = None) -> list[Problem]:
    """Every problem found in `out_dir` (empty when it is consistent); see `verify_output`."""
    return verify_output(out_dir, console).problems


def verify_output(out_dir: str | Path, console: Console | None = None) -> Verification:
    """Check `out_dir` (the --output of a run) as the module docstring lists. A progress bar over shards goes to
    `console` when given. Never modifies anything."""
    out = as_storage(out_dir)
    result = Verification(out.uri)
    problems = result.problems
    index, total = _read_index(out, problems)
    if index is None:
        return result
    listed = [entry.get("url") for entry in index]
    _check_index_entries(index, problems)
    _check_unlisted_files(out, set(listed), problems)

    contents: dict[str, _ShardContent] = {}
    progress = Progress(TextColumn("[bold blue]verify"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.fields[shard]}"), console=console, transient=True,
                        disable=console is None or not console.is_terminal)
    with progress:
        task = progress.add_task("verify", total=len(index), shard="")
        for entry in index:
            url = entry.get("url")
            progress.update(task, shard=url or "")
            if url and url not in contents:
                try:
                    check_shard(url, out)
                except UnsafeName as exc:  # never open a path index.json could point anywhere
                    problems.append(Problem("bad_index", str(exc), shard=str(url)))
                    contents[url] = _ShardContent(readable=False)
                    progress.advance(task)
                    continue
                contents[url] = _check_shard(out, entry, problems)
                result.shards += 1
                result.bytes += contents[url].size
            progress.advance(task)

    where = _check_duplicates(contents, problems)
    result.samples = len(where)
    unreadable = {url for url, c in contents.items() if not c.readable}
    if total is not None and total != sum(map(_count, index)):
        problems.append(Problem("total_mismatch", f"index.json total_samples is {total}, its shards add up to "
                                f"{sum(map(_count, index))}"))
    _check_manifest(out, where, unreadable, problems)
    _check_ledger(out, index, contents, problems)
    return result


def print_verification(result: Verification, console: Console) -> None:
    """The one-line summary, then each problem on its own line."""
    console.print(Text(printable(result.summary_line()), style="bold green" if result.ok else "bold red"))
    for problem in result.problems:  # names and words from the data: control characters shown escaped
        console.print(Text(f"  {printable(problem)}"), highlight=False)


# ---------------------------------------------------------------------------------------------------------------
# index.json and the shards directory


def _read_index(out: Storage, problems: list[Problem]) -> tuple[list[dict] | None, int | None]:
    """index.json's shard list (only entries with a string url; the others are reported) and total_samples."""
    local = out.local_path()
    if local is not None and not local.is_dir():
        problems.append(Problem("no_output", f"{out} is not a directory"))
        return None, None
    try:
        present = out.info("index.json") is not None
    except UnsafeFile as exc:
        problems.append(Problem("unsafe_file", str(exc)))
        return None, None
    if not present:
        hint = " (a run is going or was killed before it finished: resume it)" if Ledger(out).exists() else \
            " (is it the --output directory of an `s2v curate run`?)"
        problems.append(Problem("no_index", f"no index.json in {out}{hint}"))
        return None, None
    cap = int(read_limits().max_index_mb * MB)
    try:
        data = load_json(out.read_bytes("index.json", cap), "index.json", cap)
        shardlist = data["shardlist"]
        if not isinstance(shardlist, list) or not all(isinstance(e, dict) for e in shardlist):
            raise TypeError("shardlist is not a list of objects")
    except (UserFacingError, KeyError, TypeError) as exc:
        problems.append(Problem("bad_index", f"index.json cannot be read ({type(exc).__name__}: {exc})"))
        return None, None
    usable = []
    for entry in shardlist:
        if not isinstance(entry.get("url"), str):
            problems.append(Problem("bad_index", f"a shardlist entry's url is {entry.get('url')!r}, not a path"))
        else:
            usable.append(entry)
    total = data.get("total_samples")
    return usable, total if _is_count(total) else None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _count(entry: dict) -> int:
    return entry["nsamples"] if _is_count(entry.get("nsamples")) else 0


def _check_index_entries(index: list[dict], problems: list[Problem]) -> None:
    seen = set()
    for entry in index:
        url = entry.get("url")
        missing = [name for name in ("url", "nsamples", "filesize", "sha256") if entry.get(name) is None]
        if missing:
            problems.append(Problem("bad_index", f"shardlist entry {str(entry)[:200]} lacks {', '.join(missing)}",
                                    shard=url))
        wrong = [name for name in ("nsamples", "filesize") if entry.get(name) is not None
                 and not _is_count(entry[name])]
        if wrong:
            problems.append(Problem("bad_index", f"{', '.join(wrong)} not a count", shard=url))
        if url in seen:
            problems.append(Problem("bad_index", "listed twice in index.json", shard=url))
        seen.add(url)


def _check_unlisted_files(out: Storage, listed: set[str], problems: list[Problem]) -> None:
    try:  # rejects/ holds no training data, but a link there would be followed by stats and show
        for rel, what in out.irregular(REJECTS_DIR):
            problems.append(Problem("unsafe_file", f"{what}, not a regular file; never read", shard=rel))
    except UnsafeFile as exc:
        problems.append(Problem("unsafe_file", str(exc), shard=REJECTS_DIR))
    try:
        for rel, what in out.irregular(SHARD_DIR):
            problems.append(Problem("unsafe_file", f"{what}, not a regular file; never read", shard=rel))
        for entry in out.list(SHARD_DIR):
            rel = entry.rel
            if rel in listed:
                continue
            if rel.endswith(TMP_SUFFIX):
                problems.append(Problem("uncommitted_shard", "a shard being written (a run is going, or was "
                                        "killed: resume it)", shard=rel))
            else:
                problems.append(Problem("unlisted_shard", "in shards/ but not in index.json", shard=rel))
    except UnsafeFile as exc:  # shards/ itself is a link
        problems.append(Problem("unsafe_file", str(exc), shard=SHARD_DIR))


# ---------------------------------------------------------------------------------------------------------------
# One shard


def _check_shard(out: Storage, entry: dict, problems: list[Problem]) -> _ShardContent:
    url = entry["url"]
    content = _ShardContent()
    try:
        info = out.info(url)
    except UnsafeFile as exc:  # a link, a FIFO, a device: never opened
        problems.append(Problem("unsafe_file", str(exc), shard=url))
        content.readable = False
        return content
    if info is None:
        problems.append(Problem("missing_shard", "listed in index.json but not on disk", shard=url))
        content.readable = False
        return content
    size = content.size = info.size
    if entry.get("filesize") is not None and size != entry["filesize"]:
        problems.append(Problem("size_mismatch", f"{size} bytes on disk, index.json says {entry['filesize']}",
                                shard=url))
    structure = _tar_structure(out, url, size)
    if structure:
        problems.append(Problem(*structure, shard=url))
        content.readable = False

    with out.open_read(url) as f:
        reader = _HashingReader(f)
        stream = io.BufferedReader(reader, 1 << 20)
        if content.readable:  # only a tar whose structure is whole is read as samples: nothing is ever inflated
            _read_samples(url, stream, content, problems)
        while stream.read(1 << 20):  # hash what the tar reader left (end-of-archive padding, or all of a bad tar)
            pass
        content.sha256 = reader.digest.hexdigest()

    if entry.get("sha256") and content.sha256 != entry["sha256"] and size == entry.get("filesize"):
        # A size mismatch already says the bytes differ; a checksum mismatch alone is bit rot or a rewrite.
        problems.append(Problem("sha256_mismatch", f"sha256 {content.sha256[:16]}..., index.json says "
                                f"{str(entry['sha256'])[:16]}...", shard=url))
    if content.readable and _is_count(entry.get("nsamples")) and len(content.keys) != entry["nsamples"]:
        problems.append(Problem("nsamples_mismatch", f"{len(content.keys)} samples, index.json says "
                                f"{entry['nsamples']}", shard=url))
    return content


def _read_samples(url: str, stream, content: _ShardContent, problems: list[Problem]) -> None:
    """Upstream webdataset's reading of the shard (its tar expander and key grouping), each sample checked."""
    samples = group_by_keys(tar_file_expander([{"url": url, "stream": stream}], eof_value=None))
    try:
        for sample in samples:
            content.keys.append(sample["__key__"])
            problems.extend(_check_sample(url, sample))
    except Exception as exc:  # noqa: BLE001 -- whatever webdataset raises on a damaged tar is a finding
        problems.append(Problem("unreadable", f"webdataset stopped after {len(content.keys)} samples "
                                f"({type(exc).__name__}: {exc.args[0] if exc.args else exc})", shard=url))
        content.readable = False


def _tar_structure(out: Storage, url: str, size: int) -> tuple[str, str] | None:
    """(problem, detail) of why shard `url` is not a whole tar of ours, or None: the one shard reader's checks
    (pipeline/store/shards.py `iter_members`: not compressed, regular non-sparse members within the file and their
    size caps, KEY.PART names), then the end-of-archive blocks. Reads headers only."""
    end = 0
    try:
        for _key, _part, member, _read in iter_members((out, url), url):
            end = member.offset_data + -(-member.size // BLOCK) * BLOCK
    except ShardError as exc:
        return exc.reason, str(exc)
    except UnsafeName as exc:
        return "unsafe_name", str(exc)
    if size % BLOCK:
        return "truncated_tar", f"{size} bytes is not a whole number of {BLOCK}-byte tar blocks (cut short?)"
    with out.open_read(url) as f:
        f.seek(end)
        tail = f.read(2 * BLOCK)
    if len(tail) < 2 * BLOCK or tail.count(0) != len(tail):
        return "truncated_tar", "no end-of-archive blocks after the last member (cut short at a member boundary?)"
    return None


def _check_sample(url: str, sample: dict) -> list[Problem]:
    key = sample["__key__"]
    parts = {k: v for k, v in sample.items() if not k.startswith("__")}

    def problem(what: str, detail: str) -> Problem:
        return Problem(what, detail, shard=url, key=key)

    try:
        check_key(key)
        for ext in parts:
            check_part(ext)
    except UnsafeName as exc:  # a member named like a path: report it, read nothing more of the sample
        return [problem("unsafe_name", str(exc))]
    found = [problem("missing_part", f"no KEY.{ext}") for ext in ("mp4", "json") if ext not in parts]
    if "mp4" in parts and parts["mp4"][4:8] != b"ftyp":
        found.append(problem("bad_part", "KEY.mp4 does not start with an MP4 ftyp box"))
    for ext, data in parts.items():
        if ext.endswith(".png") and not data.startswith(PNG_MAGIC):
            found.append(problem("bad_part", f"KEY.{ext} is not a PNG"))
    if "json" not in parts:
        return found
    try:
        meta = parse_sample_meta(parts["json"], "KEY.json")
    except HostileData as exc:
        return [*found, problem("bad_json", str(exc))]
    if meta.get("key") != key:
        found.append(problem("key_mismatch", f"KEY.json says key {meta.get('key')!r}"))

    expected = {"mp4", "json"}
    for entity in meta.get("entities") or []:
        for ref in entity.get("references") or []:
            expected.update(ref.get(name) for name in ("file", "mask") if ref.get(name))
    if (meta.get("background") or {}).get("file"):
        expected.add(meta["background"]["file"])
    faces = meta.get("faces") or []
    if faces:
        expected.add("faces.npy")
    detections = meta.get("detections") or []
    if "dclip.npy" in parts:  # CLIP embeddings of the detections' crops (a CLIP model was configured)
        expected.add("dclip.npy")
        found += _table_rows(parts["dclip.npy"], "dclip.npy", len(detections), "detections", problem)
    segmented = "segmentation" in ((meta.get("provenance") or {}).get("stages") or {})
    if segmented or any(DMASK.fullmatch(ext) for ext in parts):
        expected.update(f"dmask{i}.png" for i in range(len(detections)))

    for ext in sorted(expected - set(parts) - {"mp4", "json"}):
        found.append(problem("missing_part", f"KEY.json names or implies KEY.{ext}, the shard has none"))
    for ext in sorted(set(parts) - expected):
        found.append(problem("unexpected_part", f"KEY.{ext} is named by nothing in KEY.json"))
    if faces and "faces.npy" in parts:
        found += _table_rows(parts["faces.npy"], "faces.npy", len(faces), "faces", problem)

    in_cross_shard = Path(url).name.startswith(f"{CROSS_PREFIX}-")
    if in_cross_shard != key.endswith(KEY_SUFFIX) or in_cross_shard != ("cross_pair" in meta):
        found.append(problem("cross_mismatch", f"{'a cross' if in_cross_shard else 'an own'} shard, key suffix "
                             f"{'present' if key.endswith(KEY_SUFFIX) else 'absent'}, cross_pair "
                             f"{'present' if 'cross_pair' in meta else 'absent'}"))
    return found


def _table_rows(data: bytes, part: str, rows: int, what: str, problem) -> list[Problem]:
    """A KEY.*.npy embedding table must be 2-D with one row per entry of KEY.json's `what` list."""
    try:
        table = load_npy(data, f"KEY.{part}")
    except HostileData as exc:
        return [problem("bad_part", str(exc))]
    if table.ndim != 2 or len(table) != rows:
        return [problem("bad_part", f"KEY.{part} is {table.shape}, KEY.json lists {rows} {what}")]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Across files


def _check_duplicates(contents: dict[str, _ShardContent], problems: list[Problem]) -> dict[str, str]:
    """key -> shard, reporting every key found more than once (within a shard too: its files were not adjacent)."""
    seen: dict[str, list[str]] = defaultdict(list)
    for url, content in contents.items():
        for key in content.keys:
            seen[key].append(url)
    for key, urls in seen.items():
        if len(urls) > 1:
            problems.append(Problem("duplicate_key", f"in {len(urls)} places: {', '.join(urls)}", key=key))
    return {key: urls[0] for key, urls in seen.items()}


def _check_manifest(out: Storage, where: dict[str, str], unreadable: set[str], problems: list[Problem]) -> None:
    if out.info("manifest.parquet") is None:
        problems.append(Problem("no_manifest", "no manifest.parquet"))
        return
    try:
        rows = _manifest_rows(out, len(where), problems)
    except Exception as exc:  # noqa: BLE001 -- pyarrow raises several types for a damaged or foreign file
        problems.append(Problem("bad_manifest", f"manifest.parquet cannot be read ({type(exc).__name__}: {exc})"))
        return
    if rows is None:
        return
    for key in sorted(set(rows) - set(where)):
        if rows[key] in unreadable:
            continue  # the damaged shard is reported already; its lost samples would only repeat it
        problems.append(Problem("manifest_extra_key", "a manifest row with no sample in any shard",
                                shard=rows[key], key=key))
    for key in sorted(set(where) - set(rows)):
        problems.append(Problem("manifest_missing_key", "a sample with no manifest row", shard=where[key], key=key))
    for key in sorted(set(where) & set(rows)):
        if rows[key] != where[key]:
            problems.append(Problem("manifest_shard", f"the manifest row says shard {rows[key]}", shard=where[key],
                                    key=key))


def _manifest_rows(out: Storage, samples: int, problems: list[Problem]) -> dict[str, str] | None:
    """key -> shard of the manifest's rows, read in batches of its two columns. A manifest declaring far more rows
    than the shards hold samples is reported from its footer without reading its rows (a few KB of parquet can
    declare millions of them)."""
    with out.open_read("manifest.parquet") as f:
        parquet = pq.ParquetFile(f)
        declared = parquet.metadata.num_rows
        if declared > 2 * samples + 1000:
            problems.append(Problem("manifest_rows", f"manifest.parquet declares {declared} rows, the shards hold "
                                    f"{samples} samples; its rows are not read"))
            return None
        rows: dict[str, str] = {}
        for batch in parquet.iter_batches(batch_size=65_536, columns=["key", "shard"]):
            for key, shard in zip(batch.column("key").to_pylist(), batch.column("shard").to_pylist()):
                if not isinstance(key, str) or not isinstance(shard, str):
                    problems.append(Problem("bad_manifest", f"manifest.parquet has a row whose key or shard is not "
                                            f"text ({printable(repr(key))[:80]}, {printable(repr(shard))[:80]})"))
                    return None
                if key in rows:
                    problems.append(Problem("manifest_duplicate", "two manifest rows", key=str(key)))
                rows[key] = shard
    return rows


def _check_ledger(out: Storage, index: list[dict], contents: dict[str, _ShardContent],
                  problems: list[Problem]) -> None:
    ledger = Ledger(out)
    if not ledger.exists():
        problems.append(Problem("no_ledger", f"no {ledger.name}: the commit log is the source of truth for resume"))
        return
    state = ledger.read()
    committed: dict[str, dict] = {name: {"nsamples": e.get("nsamples"), "bytes": e.get("bytes"),
                                         "sha256": e.get("sha256"), "keys": e.get("keys")}
                                  for name, e in state.shards.items()}
    if state.cross:
        cross_keys: dict[str, list[str]] = defaultdict(list)
        for row in state.cross.get("samples", []):
            if isinstance(row, dict):
                cross_keys[str(row.get("shard"))].append(row.get("key"))
        for s in state.cross.get("shards", []):
            committed[s["shard"]] = {"nsamples": s.get("nsamples"), "bytes": s.get("bytes"),
                                     "sha256": s.get("sha256"), "keys": cross_keys.get(s["shard"], [])}
    indexed = {e.get("url"): e for e in index}
    for name in sorted(set(committed) - set(indexed)):
        problems.append(Problem("ledger_mismatch", "committed in the ledger but not in index.json (a run is going, "
                                "or was killed: resume it)", shard=name))
    for name in sorted(set(indexed) - set(committed)):
        problems.append(Problem("ledger_mismatch", "in index.json but committed by no ledger line", shard=name))
    for name in sorted(set(indexed) & set(committed)):
        ledger, entry = committed[name], indexed[name]
        differ = [f"{field_} {ledger[field_]} vs {entry.get(index_field)}"
                  for field_, index_field in (("nsamples", "nsamples"), ("bytes", "filesize"), ("sha256", "sha256"))
                  if ledger[field_] != entry.get(index_field)]
        if differ:
            problems.append(Problem("ledger_mismatch", "ledger vs index.json: " + "; ".join(differ), shard=name))
        content = contents.get(name)
        if ledger["keys"] is not None and content is not None and content.readable \
                and sorted(ledger["keys"]) != sorted(content.keys):
            extra, lost = set(content.keys) - set(ledger["keys"]), set(ledger["keys"]) - set(content.keys)
            problems.append(Problem("ledger_keys", f"the shard's keys differ from the ledger's: {len(extra)} not in "
                                    f"the ledger, {len(lost)} missing from the shard", shard=name))
