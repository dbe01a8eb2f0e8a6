"""`s2v curate refilter`: re-apply new filter thresholds to a finished run, from its stored stats, with no model.

Every filter stores its stats on the sample (`stats.quality` per clip, `detections[].stats` per instance) and
decides from those stats alone (`quality_decision`, `instance_decision`), so new thresholds can be re-applied by
reading the shards. A refilter writes a new output directory (the source run is never touched):

- a clip whose quality stats now fail is dropped (`quality_filter`, with the reason);
- every instance is re-decided (`valid`, `rejected`, `stats.instances`); an entity keeps the valid part of its
  identity clique, and loses its reference when the instance its reference was cut from is now invalid (the
  reference is not re-cut from another keyframe: that needs the frames and the models); a further view or an
  attribute reference whose instance is now invalid is left out;
- a clip left with no reference is dropped (`consolidation` / `no_valid_entity`);
- every subject's track is re-decided (`filters.tracks`): one that now fails loses its references, and a clip left
  with none is dropped (`track_filter` / `subject_absent`);
- references are renumbered (`ref{k}`, `mask{k}`, `subject_id`) so the sample format holds;
- the cross-pair set is rebuilt from the kept samples.

It can only tighten: clips dropped by the first run have no shard to come back from. Loosening a threshold marks
more instances valid but adds none to a clique. For looser settings, curate again into a new directory.

The source run may have come from elsewhere, so nothing read from it is trusted (docs/security.md): config.yaml is
read with a size cap and its YAML aliases bounded (`load_yaml`); every KEY.json is checked (`parse_sample_meta`),
with the files refilter renames and the embedding tables it copies. A shard that cannot be read (compressed, cut
short, a link, a member that is not a plain file) or a sample that is not one this pipeline writes is skipped with
a warning naming it, and its clips are dropped (stage `refilter`, reason `unreadable_shard` / `unreadable_sample`):
the new directory is whole, with every good sample, and never holds a byte of a skipped shard.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from rich.console import Console

from pipeline.core.config import ConfigError, RunConfig, build_config, parse_override
from pipeline.core.errors import UserFacingError
from pipeline.core.names import check_shard
from pipeline.core.storage import Storage
from pipeline.core.untrusted import MB, HostileData, load_yaml, printable, read_limits
from pipeline.postpass.cross_pairs import MALFORMED, build_cross_pairs, load_table, warn_all
from pipeline.store.assemble import reference_counts
from pipeline.store.ledger import Ledger, LedgerState, as_storage, own_sample_shards
from pipeline.store.outputs import write_outputs
from pipeline.store.sample_meta import REFERENCE_FILE, parse_sample_meta
from pipeline.store.shards import ShardSink, iter_members, sample_json
from stages.instances import decide_instances
from stages.quality import quality_decision
from stages.tracking import REFERENCE_FIELDS, apply_track_decisions

REFILTERABLE = "filters."
UNREADABLE = "refilter"  # the stage of a clip dropped because its sample could not be read back
PROBLEMS_LISTED = 100  # skipped shards and samples named in the refilter ledger line (all are counted in `dropped`)
PROBLEM_CHARS = 500  # of one such line: a member name from a tar header can be megabytes, and a ledger line is capped


def load_run_config(src: Storage | Path, overrides: list[str]) -> tuple[RunConfig, str | None]:
    """The source run's config with `filters.*` overrides applied, and the source's config hash."""
    src = as_storage(src)
    if src.info("config.yaml") is None:
        raise ConfigError(f"{src} holds no finished run (no config.yaml); pass the --output of `s2v curate run`")
    # Capped and alias-bounded: a 520-byte "billion laughs" config.yaml once took 5 GB and never finished.
    raw = src.read_text("config.yaml", int(read_limits().max_index_mb * MB))
    data = load_yaml(raw, src.join("config.yaml")) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{src.join('config.yaml')}: a YAML {type(data).__name__}, not a run's settings")
    old_hash = data.pop("config_hash", None)
    old_hash = old_hash if isinstance(old_hash, str) else None
    data.pop("pipeline_version", None)
    for text in overrides:
        key, _ = parse_override(text)
        if not key.startswith(REFILTERABLE):
            raise ConfigError(f"--set {key}: refilter re-applies filters.* thresholds only; '{key}' changes what the "
                              "stages compute, so curate again with `s2v curate run --set ...` into a new --output")
    return build_config(data, overrides), old_hash


def _refilter_meta(meta: dict, config: RunConfig) -> tuple[str, str] | None:
    """Re-decide one sample's KEY.json in place; the (stage, reason) that now drops it, or None to keep it."""
    quality = meta.get("stats", {}).get("quality")
    if quality:
        reason = quality_decision(quality, config.filters.quality)
        if reason:
            return "quality_filter", reason
    detections = meta.get("detections") or []
    if not any("stats" in d for d in detections):
        return None  # no grounding in this run: nothing per instance to re-decide
    meta.setdefault("stats", {})["instances"] = decide_instances(detections, config.filters.instances)
    valid = {d["id"] for d in detections if d["valid"]}
    for entity in meta.get("entities", []):
        if "reference" not in entity:
            continue
        if entity["reference"]["detection"] in valid:
            entity["instances"] = [i for i in entity["instances"] if i in valid]
            # Views and attribute regions whose instance is now invalid lose their reference; view 0 stays.
            if "views" in entity:
                entity["views"] = [v for v in entity["views"] if v["detection"] in valid]
            if "references" in entity:
                entity["references"] = [r for r in entity["references"]
                                        if r.get("detection") is None or r["detection"] in valid]
            continue
        for name in (*REFERENCE_FIELDS, "references"):
            entity.pop(name, None)
    if not any("reference" in e for e in meta.get("entities", [])):
        return "consolidation", "no_valid_entity"
    if not apply_track_decisions(meta.get("entities", []), config.filters.tracks):
        return "track_filter", "subject_absent"
    return None


def _renumber(meta: dict, sample: dict) -> dict:
    """The sample's files with references renumbered 0, 1, ... in entity order (dropped references left out)."""
    files = {ext: data for ext, data in sample.items() if not ext.startswith(("ref", "mask"))}
    slot = k = 0
    for entity in meta.get("entities", []):
        if "reference" not in entity:
            entity.pop("references", None)  # files of no reference: not copied, so not named either
            continue
        entity["subject_id"] = slot
        slot += 1
        for reference in entity.get("references", []):
            old_ref, old_mask = reference["file"], reference["mask"]
            reference["file"], reference["mask"] = f"ref{k}.png", f"mask{k}.png"
            reference["subject_id"] = entity["subject_id"]
            files[reference["file"]], files[reference["mask"]] = sample[old_ref], sample[old_mask]
            k += 1
    return files


def _counts_of(meta: dict) -> dict:
    """What the ledger's clip entry adds up (the pipeline's `reference_counts`), from KEY.json."""
    references = [{**r, "requested": r.get("requested", r["variant"])}
                  for e in meta.get("entities", []) for r in e.get("references", [])]
    return reference_counts({"references": references, "stats": meta.get("stats", {})})


def refilter(src_dir: str | Path, dst_dir: str | Path, overrides: list[str], console: Console | None = None) -> dict:
    """Write DST: SRC's samples re-decided under `filters.*` overrides. Returns DST's summary plus `refilter` counts.
    Shards and samples of SRC that cannot be read are skipped with a warning (module doc), never a traceback."""
    console = console or Console(stderr=True)
    src, dst = as_storage(src_dir), as_storage(dst_dir)
    if not (source_ledger := Ledger(src)).exists():
        raise ConfigError(f"{src} holds no curated run (no {source_ledger.name})")
    if dst.uri == src.uri:
        raise ConfigError("refilter writes a new directory: give an --output other than the source run")
    if next(dst.list(), None) is not None:
        raise ConfigError(f"{dst} is not empty: give refilter a new --output directory")
    config, old_hash = load_run_config(src, overrides)
    state = Ledger(src).read()

    body = {"config_hash": config.hash(), "refiltered_from": {"run": src.uri, "config_hash": old_hash,
                                                               "overrides": list(overrides)},
            **config.model_dump(mode="json")}
    dst.write_text("config.yaml", yaml.safe_dump(body, sort_keys=False))
    ledger = Ledger(dst)
    for entry in [*state.input_errors.values(), *state.duplicates.values()]:
        ledger.append(entry)
    run = _Pass(config, ShardSink(dst, config.output, ledger, LedgerState()), own_sample_shards(state))
    done: set[str] = set()
    buffered: dict[str, dict] = {}
    # Shards in commit order; a shard's line names the sources it completes, so memory holds about one shard.
    for shard, shard_entry in state.shards.items():
        buffered.update(run.read_shard(src, shard))
        for source in shard_entry.get("sources", []):
            run.add_source(source, buffered)
            done.add(source["source_id"])
    for source_id, source in state.sources.items():  # sources without samples: carried over as they were
        if source_id not in done:
            ledger.append(source)
    run.sink.close()
    for entry in state.runs:
        ledger.append(entry)
    warn_all(console, run.problems, "refilter")
    line = {"type": "refilter", "from": src.uri, "from_config_hash": old_hash, "config_hash": config.hash(),
            "overrides": list(overrides), "kept": run.kept, "dropped": dict(run.dropped),
            "skipped": run.problems[:PROBLEMS_LISTED]}
    ledger.append(line)
    after = ledger.read()
    build_cross_pairs(dst, config, ledger, after, console)
    summary = write_outputs(dst, ledger.read())
    gone = ", ".join(f"{n} {why}" for why, n in sorted(run.dropped.items())) or "none"
    console.print(f"refilter: {run.kept} samples kept, dropped: {gone} -> {dst}")
    return {**summary, "refilter": line}


@dataclass
class _Pass:
    """One refilter's progress: the sink it writes to, what it kept and dropped, and what it could not read."""

    config: RunConfig
    sink: ShardSink
    shard_of: dict[str, str]  # committed own key of SRC -> its shard
    kept: int = 0
    dropped: Counter = field(default_factory=Counter)
    unreadable: set[str] = field(default_factory=set)  # shards skipped whole
    problems: list[str] = field(default_factory=list)  # one line per skipped shard or sample, naming it
    keys_of: dict[str, set[str]] = field(default_factory=dict)  # shard -> its committed keys

    def __post_init__(self):
        for key, shard in self.shard_of.items():
            self.keys_of.setdefault(shard, set()).add(key)

    def read_shard(self, src: Storage, shard: str) -> dict[str, dict]:
        """{key: {part: bytes}} of the committed samples of one shard of SRC ({} when it cannot be read: noted).
        Members of keys the ledger does not commit to this shard are skipped by their headers, never held."""
        keys = self.keys_of.get(shard, set())
        samples: dict[str, dict] = {}
        try:
            for key, part, _member, read in iter_members((src, check_shard(shard, src)), shard):
                if key in keys and not part.startswith("_"):  # "_" parts are webdataset's fields, never written
                    samples.setdefault(key, {})[part] = read()
        except (OSError, UserFacingError) as exc:  # ShardError, UnsafeName, UnsafeFile (a linked shard), StorageError
            self.unreadable.add(shard)
            self._note(f"{shard}: cannot be read, its {len(keys)} samples are not copied ({exc})")
            return {}
        return samples

    def add_source(self, source: dict, buffered: dict[str, dict]) -> None:
        """Re-decide one source's samples and hand the kept ones to the sink."""
        entry = {**source, "samples": [], "clips": [dict(c) for c in source.get("clips") or [] if isinstance(c, dict)]}
        rows = {row["key"]: row for row in source["samples"]}
        clips = {clip.get("key"): clip for clip in entry["clips"]}
        samples = []
        for key in sorted(rows):
            verdict, files, counts = self._sample(key, buffered.pop(key, None))
            clip = clips.get(key, {})
            if verdict:
                clip.update(status="dropped", stage=verdict[0], reason=verdict[1], refilter=True)
                self.dropped[f"{verdict[0]}/{verdict[1]}"] += 1
                continue
            clip.update(counts)
            entry["samples"].append({**rows[key], "shard": None})
            samples.append(files)
        self.sink.add_source(entry, samples)
        self.kept += len(samples)

    def _sample(self, key: str, parts: dict | None) -> tuple[tuple[str, str] | None, dict, dict]:
        """(what now drops the sample or None, its files, its clip counts); a sample that cannot be read back is
        dropped as `refilter` / `unreadable_*`, and said (once per shard for a shard skipped whole)."""
        shard = self.shard_of.get(key)
        if parts is None:
            if shard in self.unreadable:
                return (UNREADABLE, "unreadable_shard"), {}, {}
            self._note(f"{shard}: sample {key} is not in it; not copied" if shard else
                       f"sample {key}: the ledger names no committed shard for it; not copied")
            return (UNREADABLE, "unreadable_sample"), {}, {}
        try:
            return _reread(key, parts, self.config)
        except HostileData as exc:
            self._note(f"{shard}: sample {key} skipped: {exc}")
            return (UNREADABLE, "unreadable_sample"), {}, {}

    def _note(self, problem: str) -> None:
        self.problems.append(problem[:PROBLEM_CHARS])


def _reread(key: str, parts: dict, config: RunConfig) -> tuple[tuple[str, str] | None, dict, dict]:
    """One sample read back from SRC: (what now drops it or None, the files to write, its clip counts).
    HostileData when it is not a sample this pipeline writes: KEY.json fails the schema, a reference names a file
    the sample does not hold, an embedding table is not a plain table, or the stats and entity fields the filters
    re-decide from are missing or mistyped."""
    if "json" not in parts:
        raise HostileData("no KEY.json")
    meta = parse_sample_meta(parts["json"], "KEY.json")
    _check_parts(meta, parts)
    try:
        verdict = _refilter_meta(meta, config)
        if verdict:
            return verdict, {}, {}
        provenance = meta.get("provenance") or {}
        meta["provenance"] = {**provenance, "config_hash": config.hash(),
                              "refiltered_from": provenance.get("config_hash")}
        files = _renumber(meta, {**parts, "__key__": key})
        files["json"] = sample_json(meta)
        return None, files, _counts_of(meta)
    except MALFORMED as exc:
        # The schema checks what every reader computes with; the filter stats and entity fields refilter re-decides
        # from are let through there as they are. One missing or of the wrong type is no sample of this pipeline.
        raise HostileData(f"KEY.json: not a sample refilter can re-decide ({type(exc).__name__}: "
                          f"{printable(exc)[:200]})") from None


def _check_parts(meta: dict, parts: dict) -> None:
    """The files refilter renames are the sample's own (`refK.png` / `maskK.png` members it holds: a name such as
    `../x` or `mp4` is refused), and the embedding tables it copies are plain tables, faces.npy one row per face."""
    for entity in meta.get("entities") or []:
        for ref in entity.get("references") or []:
            for name, pattern in REFERENCE_FILE.items():
                value = ref.get(name)
                if not (isinstance(value, str) and pattern.fullmatch(value) and value in parts):
                    raise HostileData(f"KEY.json: reference {name} {printable(repr(value))[:80]} is not a "
                                      f"{pattern.pattern} member of the sample")
    for ext in ("faces.npy", "dclip.npy"):
        if ext in parts:
            table = load_table(parts[ext], f"KEY.{ext}")
            if ext == "faces.npy" and len(table) != len(meta.get("faces") or []):
                raise HostileData(f"KEY.faces.npy: {len(table)} rows, KEY.json lists {len(meta.get('faces') or [])} "
                                  "faces")
