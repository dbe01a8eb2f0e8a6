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
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import yaml
from rich.console import Console

from pipeline.core.config import ConfigError, RunConfig, build_config, parse_override
from pipeline.core.names import check_shard
from pipeline.core.storage import Storage
from pipeline.postpass.cross_pairs import build_cross_pairs
from pipeline.store.assemble import reference_counts
from pipeline.store.ledger import Ledger, LedgerState, as_storage
from pipeline.store.outputs import write_outputs
from pipeline.store.shards import ShardSink, read_shard_samples, sample_json
from stages.instances import decide_instances
from stages.quality import quality_decision
from stages.tracking import REFERENCE_FIELDS, apply_track_decisions

REFILTERABLE = "filters."


def load_run_config(src: Storage | Path, overrides: list[str]) -> tuple[RunConfig, str]:
    """The source run's config with `filters.*` overrides applied, and the source's config hash."""
    src = as_storage(src)
    if src.info("config.yaml") is None:
        raise ConfigError(f"{src} holds no finished run (no config.yaml); pass the --output of `s2v curate run`")
    data = yaml.safe_load(src.read_text("config.yaml")) or {}
    old_hash = data.pop("config_hash", None)
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
        for field in (*REFERENCE_FIELDS, "references"):
            entity.pop(field, None)
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
    """Write DST: SRC's samples re-decided under `filters.*` overrides. Returns DST's summary plus `refilter` counts."""
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
    dropped, kept = Counter(), 0
    sink = ShardSink(dst, config.output, ledger, LedgerState())
    done: set[str] = set()
    buffered: dict[str, dict] = {}
    # Shards in commit order; a shard's line names the sources it completes, so memory holds about one shard.
    for shard, shard_entry in state.shards.items():
        buffered.update(read_shard_samples((src, check_shard(shard, src))))
        for source in shard_entry.get("sources", []):
            kept += _refilter_source(source, buffered, config, sink, dropped)
            done.add(source["source_id"])
    for source_id, source in state.sources.items():  # sources without samples: carried over as they were
        if source_id not in done:
            ledger.append(source)
    sink.close()
    for run in state.runs:
        ledger.append(run)
    line = {"type": "refilter", "from": src.uri, "from_config_hash": old_hash, "config_hash": config.hash(),
            "overrides": list(overrides), "kept": kept, "dropped": dict(dropped)}
    ledger.append(line)
    after = ledger.read()
    build_cross_pairs(dst, config, ledger, after, console)
    summary = write_outputs(dst, ledger.read())
    gone = ", ".join(f"{n} {why}" for why, n in sorted(dropped.items())) or "none"
    console.print(f"refilter: {kept} samples kept, dropped: {gone} -> {dst}")
    return {**summary, "refilter": line}


def _refilter_source(source: dict, buffered: dict[str, dict], config: RunConfig, sink: ShardSink,
                     dropped: Counter) -> int:
    """Re-decide one source's samples and hand the kept ones to the sink; returns how many were kept."""
    entry = {**source, "samples": [], "clips": [dict(c) for c in source["clips"]]}
    rows = {row["key"]: row for row in source["samples"]}
    clips = {clip["key"]: clip for clip in entry["clips"]}
    samples = []
    for key in sorted(rows):
        sample = buffered.pop(key)
        meta = json.loads(sample["json"])
        verdict = _refilter_meta(meta, config)
        clip = clips[key]
        if verdict:
            clip.update(status="dropped", stage=verdict[0], reason=verdict[1], refilter=True)
            dropped[f"{verdict[0]}/{verdict[1]}"] += 1
            continue
        meta["provenance"] = {**meta.get("provenance", {}), "config_hash": config.hash(),
                              "refiltered_from": meta.get("provenance", {}).get("config_hash")}
        files = _renumber(meta, sample)
        files["json"] = sample_json(meta)
        clip.update(_counts_of(meta))
        entry["samples"].append({**rows[key], "shard": None})
        samples.append(files)
    sink.add_source(entry, samples)
    return len(samples)
