"""`s2v shards stats`: what one or more output directories hold, from the commit ledger and the samples' KEY.json.

Reads the ledger, not summary.json or manifest.parquet, so it also works while a job is still writing: the per-sample
rows are the ledger's copy of the manifest rows of committed sources, and KEY.json is read only from committed
shards (a `.tar.tmp` being written is counted, never opened). Nothing is cached on disk.

The HTML report (`pipeline/inspection/report.py`) draws its plots from the same loaded data (`load_run`).
"""

from __future__ import annotations

import json
import math
from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pipeline.core.config import face_thresholds
from pipeline.core.errors import UserFacingError
from pipeline.core.names import check_shard
from pipeline.core.storage import Storage, UnsafeFile
from pipeline.core.untrusted import MB, HostileData, load_yaml, printable, read_limits
from pipeline.store.funnel import Funnel, recorded_order
from pipeline.store.ledger import SHARD_DIR, Ledger, LedgerState, as_storage, own_sample_shards
from pipeline.store.outputs import summarize
from pipeline.store.sample_meta import parse_sample_meta
from pipeline.store.shards import TMP_SUFFIX, iter_members

VARIANTS = ("crop", "segment", "inpaint", "redux")
TOP_N = 10  # rows of the terminal's category and attribute tables


class StatsError(UserFacingError, ValueError):
    pass


# ---------------------------------------------------------------------------------------------------------------
# What the samples hold


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


FACE_FIELDS = ("score", "yaw", "pitch", "size_px")
INSTANCE_STATS = ("area", "max_iou", "brightness", "sharpness", "clip_category", "face_score")


class SampleFacts:
    """What the statistics need of the samples' KEY.json, accumulated one sample at a time: counters and flat
    arrays (a few hundred bytes a sample), so a run of a million samples is never held as parsed JSON."""

    def __init__(self):
        self.samples = 0
        self.kinds, self.categories, self.referenced, self.attributes = Counter(), Counter(), Counter(), Counter()
        # Per referenced entity: how many views it has (MV-S2V); per attribute part: references cut (LumosX).
        self.views, self.attribute_refs = Counter(), Counter()
        self.per_sample = {"entities": Counter(), "references": Counter(), "subjects": Counter()}
        self.faces: dict[str, array] = {name: array("d") for name in (*FACE_FIELDS, "frontal")}
        # Instance-filter scores of every detection with stats, and whether that detection passed the filter.
        self.detections: dict[str, tuple[array, array]] = {n: (array("d"), array("b")) for n in INSTANCE_STATS}
        self.metrics: dict[str, array] = defaultdict(lambda: array("d"))
        self.flags: Counter = Counter()  # (name, True | False) -> samples' entries with that value
        self.metric_samples = 0  # samples with stats.metrics
        self.flagged: Counter = Counter()  # flag name -> samples whose stats.metrics "flags" list names it

    def add(self, meta: dict) -> None:
        self.samples += 1
        entities = meta.get("entities") or []
        self.per_sample["entities"][len(entities)] += 1
        self.per_sample["references"][sum(len(e.get("references") or []) for e in entities)] += 1
        self.per_sample["subjects"][sum(1 for e in entities if e.get("kind") == "subject")] += 1
        for entity in entities:
            self.kinds[entity.get("kind") or "?"] += 1
            category = f"{entity.get('category') or entity.get('word') or '?'} ({entity.get('kind') or '?'})"
            self.categories[category] += 1
            if entity.get("references"):
                self.referenced[category] += 1
                refs = [r for r in entity["references"] if isinstance(r, dict)]
                self.views[len({r.get("view_id") for r in refs if not r.get("attribute")})] += 1
                self.attribute_refs.update(str(r["attribute"]) for r in refs if r.get("attribute"))
            for slot, words in (entity.get("attributes") or {}).items():
                for word in words or []:
                    self.attributes[f"{slot}: {word}"] += 1
        for face in meta.get("faces") or []:
            for name in FACE_FIELDS:
                if (v := _number(face.get(name))) is not None:
                    self.faces[name].append(v)
            if isinstance(face.get("frontal"), bool):
                self.faces["frontal"].append(float(face["frontal"]))
        for det in meta.get("detections") or []:
            stats = det.get("stats")
            if not isinstance(stats, dict):
                continue
            face = stats.get("face") if isinstance(stats.get("face"), dict) else {}
            for name in INSTANCE_STATS:
                v = _number(face.get("score") if name == "face_score" else stats.get(name))
                if v is not None:
                    self.detections[name][0].append(v)
                    self.detections[name][1].append(bool(det.get("valid")))
        metrics = (meta.get("stats") or {}).get("metrics")
        if metrics:
            self._flatten(metrics, "")
            self.metric_samples += 1
            flags = metrics.get("flags") if isinstance(metrics, dict) else None
            self.flagged.update({name for name in flags or [] if isinstance(name, str)})

    def _flatten(self, node, prefix: str) -> None:
        """Every number under its dotted path, every true/false flag; lists (per-reference entries) pooled under
        one name; strings and nulls skipped."""
        if isinstance(node, bool):
            self.flags[(prefix, node)] += 1
        elif isinstance(node, dict):
            for key, value in node.items():
                self._flatten(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, list):
            for value in node:
                self._flatten(value, prefix)
        elif (v := _number(node)) is not None:
            self.metrics[prefix].append(v)

    def merge(self, other: SampleFacts) -> SampleFacts:
        """Add another directory's facts to these (in place); returns self."""
        self.samples += other.samples
        for mine, theirs in ((self.kinds, other.kinds), (self.categories, other.categories),
                             (self.referenced, other.referenced), (self.attributes, other.attributes),
                             (self.flags, other.flags), (self.views, other.views),
                             (self.attribute_refs, other.attribute_refs)):
            mine.update(theirs)
        for name, counts in other.per_sample.items():
            self.per_sample[name].update(counts)
        for name, values in other.faces.items():
            self.faces[name].extend(values)
        for name, (values, valid) in other.detections.items():
            self.detections[name][0].extend(values)
            self.detections[name][1].extend(valid)
        for name, values in other.metrics.items():
            self.metrics[name].extend(values)
        self.metric_samples += other.metric_samples
        self.flagged.update(other.flagged)
        return self

    def metric_values(self) -> tuple[dict[str, array], dict[str, tuple[int, int]]]:
        """Data-quality metrics of KEY.json `stats.metrics`, whatever their layout: {dotted path: values} and
        {dotted path of a flag: (true, of)}. Both empty when no sample has metrics."""
        names = sorted({name for name, _ in self.flags})
        flags = {n: (self.flags[(n, True)], self.flags[(n, True)] + self.flags[(n, False)]) for n in names}
        return dict(sorted(self.metrics.items())), flags

    def flagged_samples(self) -> dict[str, tuple[int, int]]:
        """{flag: (samples whose stats.metrics "flags" list names it, samples with stats.metrics)}."""
        return {name: (n, self.metric_samples) for name, n in sorted(self.flagged.items())}


@dataclass
class RunData:
    """One output directory as committed now: the ledger state, the resolved config, the manifest rows of the
    committed own samples (key order), the facts of their KEY.json, and what could not be read."""

    out_dir: str  # the output's path or URI
    state: LedgerState
    config: dict
    rows: list[dict]
    facts: SampleFacts
    uncommitted: list[str] = field(default_factory=list)  # shard files being written (or left by a killed run)
    problems: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _defaults() -> dict:
    from pipeline.core.config import RunConfig

    return RunConfig().model_dump(mode="json")


def _merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge(base[key], value) if isinstance(value, dict) and isinstance(base.get(key), dict) else value
    return merged


def read_config(out: Storage | Path) -> tuple[dict, str | None]:
    """config.yaml of the run over the defaults (so a key a later release added still has its value), and a note
    when the file is missing or unreadable (a run killed before it read its inputs has none)."""
    out = as_storage(out)
    try:
        if out.info("config.yaml") is None:
            return _defaults(), "no config.yaml: thresholds and ratios shown are the defaults"
        data = load_yaml(out.read_text("config.yaml", int(read_limits().max_index_mb * MB)), "config.yaml") or {}
    except UserFacingError as exc:  # HostileData (limits, bad YAML), UnsafeFile, StorageError
        return _defaults(), f"config.yaml unreadable ({exc}): thresholds and ratios shown are the defaults"
    return _merge(_defaults(), data if isinstance(data, dict) else {}), None


def read_samples(out: Storage, state: LedgerState, facts: SampleFacts) -> list[str]:
    """Add the KEY.json of every committed own sample to `facts`; return the shards that could not be read. Only
    the json members are read: tar headers are walked, the other members skipped."""
    wanted = own_sample_shards(state)
    problems = []
    read = bad = 0
    for shard in sorted(set(wanted.values())):
        try:
            for key, part, _member, read_member in iter_members((out, check_shard(shard, out)), shard):
                if part == "json" and wanted.get(key) == shard:
                    try:
                        meta = parse_sample_meta(read_member(), f"{shard} {key}.json")
                    except HostileData as exc:  # one sample left out of the statistics, and said so
                        bad += 1
                        if bad <= 10:
                            problems.append(f"left out: {exc}")
                        continue
                    facts.add(meta)
                    read += 1
        except (OSError, UserFacingError) as exc:  # ShardError, UnsafeFile, UnsafeName, StorageError
            problems.append(f"{shard}: cannot read ({type(exc).__name__}: {exc})")
    if bad > 10:
        problems.append(f"left out: {bad - 10} more samples whose KEY.json is not one of ours")
    if read + bad < len(wanted) and not problems:
        problems.append(f"{len(wanted) - read} committed samples have no KEY.json in their shard")
    return problems


def load_run(out_dir: str | Path) -> RunData:
    out = as_storage(out_dir)
    ledger = Ledger(out)
    started = out.info("config.yaml") is not None  # a run writes it before its first commit
    committed = ledger.exists()
    if not committed and not started:
        raise StatsError(f"{out}: no {ledger.name} here; is it the --output directory of an `s2v curate run`?")
    state = ledger.read()
    config, note = read_config(out)
    if not committed:
        note = f"a run started here but has committed nothing yet (no {ledger.name})"
    rows = sorted((row for entry in state.sources.values() for row in entry.get("samples", [])),
                  key=lambda r: r["key"])
    facts = SampleFacts()
    problems = read_samples(out, state, facts)
    # Shards being written (POSIX: under a temporary name; an object appears only when complete).
    try:
        uncommitted = sorted(e.rel.rsplit("/", 1)[-1] for e in out.list(SHARD_DIR) if e.rel.endswith(TMP_SUFFIX))
    except UnsafeFile as exc:
        uncommitted, problems = [], [*problems, str(exc)]
    return RunData(out.uri, state, config, rows, facts, uncommitted, ([note] if note else []) + problems)


def clip_values(rows: list[dict]) -> dict[str, list[float]]:
    """Manifest columns of the samples: duration_s, fps, width, height, brightness, sharpness."""
    values: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for name in ("duration_s", "fps", "width", "height", "brightness", "sharpness"):
            if (v := _number(row.get(name))) is not None:
                values[name].append(v)
    return values


def content_counts(facts: SampleFacts) -> dict:
    """Entity kinds, categories and attribute words, and entities / references / subjects per sample."""
    return {
        "samples_read": facts.samples,
        "kinds": dict(facts.kinds.most_common()),
        "categories": dict(facts.categories.most_common()),
        "categories_with_references": dict(facts.referenced.most_common()),
        "attributes": dict(facts.attributes.most_common()),
        "per_sample": {name: {str(n): c[n] for n in sorted(c)} for name, c in facts.per_sample.items()},
        "views_per_entity": {str(n): facts.views[n] for n in sorted(facts.views)},
        "attribute_references": dict(facts.attribute_refs.most_common()),
    }


# ---------------------------------------------------------------------------------------------------------------
# Summaries


def _histogram(values, bins: int = 8) -> list[dict]:
    counts, edges = np.histogram(np.asarray(values, dtype=float), bins=bins)
    return [{"from": float(a), "to": float(b), "count": int(c)} for a, b, c in zip(edges[:-1], edges[1:], counts)]


def _describe(values) -> dict:
    a = np.asarray(values, dtype=float)
    if not a.size:
        return {"count": 0, "min": None, "mean": None, "max": None}
    return {"count": int(a.size), "min": float(a.min()), "mean": float(a.mean()), "max": float(a.max())}


def thresholds(config: dict) -> dict:
    """The thresholds the plots draw: filters.quality, filters.instances and faces, from config.yaml."""
    filters = config.get("filters") or {}
    faces = config.get("faces") or {}
    metrics = config.get("metrics") or {}
    return {"quality": dict(filters.get("quality") or {}), "instances": dict(filters.get("instances") or {}),
            "faces": {k: faces.get(k) for k in ("min_score", "min_face_px", "max_yaw", "max_pitch")},
            # The face flags' limits in force: the configured ones, else the face backend's defaults.
            "metrics": {f"face_{k}": v for k, v in face_thresholds(metrics.get("face_copy_paste"),
                                                                   metrics.get("face_mismatch"),
                                                                   faces.get("backend") or "dlib").items()}}


def configured_ratio(config: dict) -> dict[str, float]:
    ratio = {k: float(v) for k, v in ((config.get("references") or {}).get("ratio") or {}).items()}
    total = sum(ratio.values())
    return {k: v / total for k, v in ratio.items()} if total > 0 else {}


def variant_mix(references: dict | None, configured: dict[str, float]) -> list[dict]:
    """Per variant: the configured share, the share the ratio drew (requested), and the share made."""
    references = references or {}
    made, asked = references.get("variants") or {}, references.get("requested") or {}
    n_made, n_asked = sum(made.values()), sum(asked.values())
    return [{"variant": v, "configured": configured.get(v, 0.0), "requested": asked.get(v, 0),
             "requested_share": asked.get(v, 0) / n_asked if n_asked else 0.0,
             "made": made.get(v, 0), "made_share": made.get(v, 0) / n_made if n_made else 0.0}
            for v in VARIANTS if configured.get(v) or made.get(v) or asked.get(v)]


def cross_share(own_samples: int, cross: dict | None, configured: float | None) -> dict:
    n_cross = (cross or {}).get("samples", 0)
    total = own_samples + n_cross
    return {"own": own_samples, "cross": n_cross, "share": n_cross / total if total else 0.0,
            "configured": configured, "kinds": dict((cross or {}).get("kinds") or {}), "built": cross is not None}


def run_kpis(run: dict) -> dict:
    """Throughput of one run entry; per GPU too when the entry records GPUs."""
    kpis = {k: run.get(k) for k in ("run", "started", "mode", "cpus", "wall_s", "sources", "clips", "samples",
                                    "video_s", "clips_per_s", "video_hours_per_day_per_core")}
    gpus = _number(run.get("gpus"))
    if gpus and run.get("wall_s"):
        kpis["gpus"] = gpus
        kpis["video_hours_per_day_per_gpu"] = (run.get("video_s") or 0) / 3600 / (run["wall_s"] / 86400) / gpus
    return kpis


def throughput(runs: list[dict]) -> dict:
    """Each finished run, and all of them together: clips over wall time, and video-hours per day per core
    weighted by core-seconds (a 2-core run of 1 h and an 8-core run of 1 h do not count the same)."""
    per_run = [run_kpis(r) for r in runs]
    wall = sum(r.get("wall_s") or 0 for r in runs)
    core_s = sum((r.get("wall_s") or 0) * (r.get("cpus") or 0) for r in runs)
    video_s = sum(r.get("video_s") or 0 for r in runs)
    total = {"runs": len(runs), "wall_s": wall, "clips": sum(r.get("clips") or 0 for r in runs), "video_s": video_s,
             "clips_per_s": sum(r.get("clips") or 0 for r in runs) / wall if wall else None,
             "video_hours_per_day_per_core": (video_s / 3600) / (core_s / 86400) if core_s else None}
    return {"runs": per_run, "total": total}


def _sample_level(summary: dict, rows: list[dict], facts: SampleFacts) -> None:
    durations = [v for v in (_number(r.get("duration_s")) for r in rows) if v is not None]
    summary["durations_s"] = (
        {"min": float(min(durations)), "mean": float(np.mean(durations)), "max": float(max(durations)),
         "histogram": _histogram(durations)}
        if durations else {"min": None, "mean": None, "max": None, "histogram": []}
    )
    clips = clip_values(rows)
    summary["clip_shapes"] = {
        "fps": dict(Counter(f"{v:g}" for v in clips["fps"]).most_common()),
        "resolutions": dict(Counter(f"{int(r['width'])}x{int(r['height'])}" for r in rows
                                    if _number(r.get("width")) and _number(r.get("height"))).most_common()),
    }
    summary["content"] = content_counts(facts)
    faces = facts.faces
    summary["faces"] = {"count": len(faces["score"]), "frontal": int(sum(faces["frontal"])),
                        "score": _describe(faces["score"]), "yaw": _describe(faces["yaw"]),
                        "pitch": _describe(faces["pitch"])}
    numbers, flags = facts.metric_values()
    summary["metrics"] = {"values": {k: _describe(v) for k, v in numbers.items()},
                          "flags": {k: {"true": t, "of": n} for k, (t, n) in flags.items()},
                          "samples_flagged": {k: {"true": t, "of": n} for k, (t, n) in facts.flagged_samples().items()}}


def summarize_run(run: RunData) -> dict:
    """summary.json's fields for the committed state now, plus what the samples hold (see docs/inspecting.md)."""
    summary = summarize(run.state)
    _sample_level(summary, run.rows, run.facts)
    summary["variant_mix"] = variant_mix(summary["references"], configured_ratio(run.config))
    summary["cross_share"] = cross_share(summary["samples"], summary["cross_pairs"],
                                         (run.config.get("cross_pairs") or {}).get("share"))
    summary["throughput"] = throughput(summary["runs"])
    summary["thresholds"] = thresholds(run.config)
    summary["uncommitted_shards"] = run.uncommitted
    summary["problems"] = run.problems
    summary["out_dir"] = str(run.out_dir)
    return summary


def shard_stats(out_dir: str | Path) -> dict:
    """Everything `s2v shards stats OUT --json` prints for one output directory."""
    return summarize_run(load_run(out_dir))


def _merged_funnel(runs: list[RunData], summaries: list[dict]) -> list[dict]:
    """The funnels of several directories as one: removals summed per (unit, stage), the chain recomputed."""
    funnel = Funnel()
    for summary in summaries:
        funnel.add_rows(summary["funnel"])
    return funnel.rows(recorded_order(line for run in runs for line in run.state.runs))


def pooled_facts(runs: list[RunData]) -> SampleFacts:
    if len(runs) == 1:
        return runs[0].facts
    pooled = SampleFacts()
    for run in runs:
        pooled.merge(run.facts)
    return pooled


def directory_row(summary: dict) -> dict:
    share = summary["cross_share"]
    return {"out_dir": summary["out_dir"], "sources": summary["sources"], "clips": summary["clips"],
            "samples": summary["samples"], "cross": share["cross"], "shards": summary["shards"],
            "bytes": summary["bytes"], "sample_video_hours": summary["sample_video_hours"],
            "video_hours_per_day_per_core": summary["throughput"]["total"]["video_hours_per_day_per_core"],
            "uncommitted_shards": len(summary["uncommitted_shards"]), "problems": len(summary["problems"])}


def combine(runs: list[RunData]) -> dict:
    """One summary over several output directories (a single one: its own summary), with a row per directory
    under "directories". Sums the ledger totals, merges the funnels and pools the samples."""
    summaries = [summarize_run(r) for r in runs]
    if len(summaries) == 1:
        return {**summaries[0], "directories": [directory_row(summaries[0])]}
    summed = ("sources", "duplicates", "clips", "samples", "shards", "bytes", "input_video_hours",
              "sample_video_hours")
    combined: dict = {k: sum(s[k] for s in summaries) for k in summed}
    combined["funnel"] = _merged_funnel(runs, summaries)
    instances = [s["instances"] for s in summaries if s["instances"]]
    combined["instances"] = {
        "total": sum(i["total"] for i in instances), "valid": sum(i["valid"] for i in instances),
        "rejected": dict(sum((Counter(i["rejected"]) for i in instances), Counter())),
    } if instances else None
    variants = sum((Counter((s["references"] or {}).get("variants") or {}) for s in summaries), Counter())
    requested = sum((Counter((s["references"] or {}).get("requested") or {}) for s in summaries), Counter())
    n = sum(variants.values())
    combined["references"] = {"total": n, "variants": dict(variants), "requested": dict(requested),
                              "shares": {v: round(c / n, 4) for v, c in variants.items()}} if n else None
    crosses = [s["cross_pairs"] for s in summaries if s["cross_pairs"]]
    combined["cross_pairs"] = {
        "samples": sum(c["samples"] for c in crosses),
        "kinds": dict(sum((Counter(c.get("kinds") or {}) for c in crosses), Counter())),
        "shards": sum(c["shards"] for c in crosses), "bytes": sum(c["bytes"] for c in crosses),
    } if crosses else None
    combined["inputs"] = {
        "inputs": sum(s["inputs"]["inputs"] for s in summaries),
        "by_status": dict(sum((Counter(s["inputs"]["by_status"]) for s in summaries), Counter())),
        "with_samples": sum(s["inputs"]["with_samples"] for s in summaries),
        "without_samples": sum(s["inputs"]["without_samples"] for s in summaries),
        "reasons": dict(sum((Counter(s["inputs"]["reasons"]) for s in summaries), Counter()).most_common()),
        "examples": [e for s in summaries for e in s["inputs"]["examples"]][:20],
    }
    combined["runs"] = [r for s in summaries for r in s["runs"]]
    combined["last_run"] = None  # several directories have several last runs: see "throughput"
    _sample_level(combined, [row for r in runs for row in r.rows], pooled_facts(runs))
    # Ratios and shares are judged against each directory's own config; pooled, against their sample-weighted mean.
    weights = [max(s["samples"], 1) for s in summaries]
    ratio = Counter()
    for run, w in zip(runs, weights):
        for k, v in configured_ratio(run.config).items():
            ratio[k] += v * w / sum(weights)
    combined["variant_mix"] = variant_mix(combined["references"], dict(ratio))
    shares = {(r.config.get("cross_pairs") or {}).get("share") for r in runs}
    combined["cross_share"] = cross_share(combined["samples"], combined["cross_pairs"],
                                          shares.pop() if len(shares) == 1 else None)
    combined["throughput"] = throughput(combined["runs"])
    configs = {json.dumps(thresholds(r.config), sort_keys=True) for r in runs}
    combined["thresholds"] = thresholds(runs[0].config)
    combined["uncommitted_shards"] = [f"{s['out_dir']}/{SHARD_DIR}/{n}" for s in summaries
                                      for n in s["uncommitted_shards"]]
    combined["problems"] = [f"{s['out_dir']}: {p}" for s in summaries for p in s["problems"]]
    if len(configs) > 1:
        combined["problems"].append("the directories' filter thresholds differ: the plots draw the first one's")
    combined["out_dir"] = f"{len(runs)} directories"
    combined["directories"] = [directory_row(s) for s in summaries]
    return combined


def combined_stats(out_dirs: list) -> dict:
    """The summary of several output directories together (see `combine`)."""
    return combine([load_run(d) for d in out_dirs])


# ---------------------------------------------------------------------------------------------------------------
# Terminal


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f} %"


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _bar(count: int, peak: int, width: int = 30) -> str:
    return "#" * round(width * count / (peak or 1))


def terminal_safe(value):
    """Every string in `value` (keys too) as plain text for a terminal and for rich: control characters shown
    escaped (`printable`) and rich markup escaped, so a word like `[link=...]` or an OSC 52 sequence in a KEY.json
    prints as the characters it is and does nothing else."""
    if isinstance(value, str):
        return escape(printable(value))
    if isinstance(value, dict):
        return {terminal_safe(k) if isinstance(k, str) else k: terminal_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(terminal_safe(v) for v in value)
    return value


def print_stats(summary: dict, console: Console) -> None:
    summary = terminal_safe(summary)  # everything below prints words from the data through rich markup
    """The terminal report of `shard_stats` (one directory) or `combined_stats` (several)."""
    _print_directories(summary, console)
    _print_totals(summary, console)

    funnel = Table(title="Funnel")
    for column in ("stage", "unit", "in", "out", "removed (reason: count)"):
        funnel.add_column(column, justify="right" if column in ("in", "out") else "left")
    for step in summary["funnel"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(step["removed"].items())) or "-"
        funnel.add_row(step["stage"], step["unit"], str(step["in"]), str(step["out"]), reasons)
    console.print(funnel)

    _print_inputs(summary, console)
    _print_variants(summary, console)
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
        peak = max(b["count"] for b in d["histogram"])
        for b in d["histogram"]:
            hist.add_row(f"{b['from']:.2f}-{b['to']:.2f}", str(b["count"]), _bar(b["count"], peak))
        console.print(hist)
    _print_content(summary, console)
    _print_faces_and_metrics(summary, console)
    _print_throughput(summary, console)
    for name in summary.get("uncommitted_shards") or []:
        console.print(f"[yellow]in progress[/]: {name} is being written (or was left by a killed run): not counted")
    for problem in summary.get("problems") or []:
        console.print(f"[yellow]note[/]: {problem}")


def _print_directories(summary: dict, console: Console) -> None:
    rows = summary.get("directories") or []
    if len(rows) < 2:
        return
    table = Table(title="Directories")
    for column in ("directory", "sources", "clips", "samples", "cross", "shards", "MB", "video-h/day/core"):
        table.add_column(column, justify="left" if column == "directory" else "right")
    for r in rows + [{"out_dir": "total", **{k: summary[k] for k in ("sources", "clips", "samples", "shards",
                                                                         "bytes")},
                      "cross": summary["cross_share"]["cross"],
                      "video_hours_per_day_per_core": summary["throughput"]["total"]["video_hours_per_day_per_core"]}]:
        table.add_row(r["out_dir"], str(r["sources"]), str(r["clips"]), str(r["samples"]), str(r["cross"]),
                      str(r["shards"]), f"{r['bytes'] / 1e6:.1f}", _fmt(r["video_hours_per_day_per_core"], ".1f"))
    console.print(table)


def _print_totals(summary: dict, console: Console) -> None:
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
    share = summary.get("cross_share")
    cross = summary.get("cross_pairs")
    configured = share["configured"] if share else None
    if cross is not None:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted((cross.get("kinds") or {}).items())) or "-"
        line = f"{cross['samples']} ({_pct(share['share'])} of all, configured {_pct(configured)}); replaced: {kinds}"
        rows.append(("cross-paired samples", line))
    elif configured:
        rows.append(("cross-paired samples", f"none yet (configured share {_pct(configured)}; built after a run)"))
    for name, value in rows:
        totals.add_row(name, str(value))
    console.print(totals)


def _print_inputs(summary: dict, console: Console) -> None:
    inputs = summary.get("inputs")
    if not inputs:
        return
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(inputs["by_status"].items()))
    console.print(f"Inputs: {inputs['inputs']} ({statuses}); {inputs['with_samples']} gave samples, "
                  f"{inputs['without_samples']} gave none")
    if inputs["without_samples"]:
        table = Table(title="Inputs without samples (sources.parquet has every input; `s2v shards why OUT NAME`)")
        for column in ("input", "status", "why"):
            table.add_column(column)
        for example in inputs["examples"]:
            table.add_row(example["source"], example["status"], example["reason"] or "-")
        if inputs["without_samples"] > len(inputs["examples"]):
            table.add_row(f"... {inputs['without_samples'] - len(inputs['examples'])} more", "", "")
        console.print(table)


def _print_variants(summary: dict, console: Console) -> None:
    refs = summary.get("references")
    if not refs:
        return
    mix = Table(title=f"Reference variants ({refs['total']} references in the samples)")
    for column in ("variant", "references", "share", "configured ratio", "drawn by the ratio"):
        mix.add_column(column, justify="left" if column == "variant" else "right")
    for row in summary.get("variant_mix") or []:
        note = " (unavailable)" if row["requested"] and not row["made"] else ""
        mix.add_row(row["variant"], str(row["made"]), _pct(row["made_share"]), _pct(row["configured"]),
                    f"{row['requested']}{note}")
    console.print(mix)


def _print_content(summary: dict, console: Console) -> None:
    content = summary.get("content") or {}
    if not content.get("samples_read"):
        return
    per = content["per_sample"]
    table = Table(title=f"Counts per sample ({content['samples_read']} samples)")
    for column in ("N", "entities", "references", "subjects"):
        table.add_column(column, justify="right")
    for n in sorted({int(k) for c in per.values() for k in c}):
        table.add_row(str(n), *(str(per[c].get(str(n), 0)) for c in ("entities", "references", "subjects")))
    console.print(table)
    views = content.get("views_per_entity") or {}
    if views:
        console.print("Views per referenced entity (MV-S2V): "
                      + ", ".join(f"{n} view{'s' if n != '1' else ''}: {c}" for n, c in views.items())
                      + "; attribute references (LumosX): "
                      + (", ".join(f"{k} {v}" for k, v in content["attribute_references"].items()) or "none"))
    for title, counts, extra in (("Top categories", content["categories"], content["categories_with_references"]),
                                 ("Top attributes", content["attributes"], None)):
        if not counts:
            continue
        table = Table(title=f"{title} ({len(counts)} distinct)")
        table.add_column("category (kind)" if extra is not None else "slot: word")
        table.add_column("entities" if extra is not None else "mentions", justify="right")
        if extra is not None:
            table.add_column("with a reference", justify="right")
        for name, n in list(counts.items())[:TOP_N]:
            table.add_row(name, str(n), *([str(extra.get(name, 0))] if extra is not None else []))
        console.print(table)
    shapes = summary.get("clip_shapes") or {}
    if shapes.get("fps") or shapes.get("resolutions"):
        fps = ", ".join(f"{k} fps: {v}" for k, v in shapes["fps"].items())
        res = ", ".join(f"{k}: {v}" for k, v in shapes["resolutions"].items())
        console.print(f"Clips by frame rate: {fps}; by size: {res}")


def _print_faces_and_metrics(summary: dict, console: Console) -> None:
    faces = summary.get("faces") or {}
    if faces.get("count"):
        s, yaw = faces["score"], faces["yaw"]
        console.print(f"Faces in the samples: {faces['count']} ({faces['frontal']} frontal); score "
                      f"{_fmt(s['min'])}-{_fmt(s['max'])} (mean {_fmt(s['mean'])}); yaw "
                      f"{_fmt(yaw['min'], '.1f')} to {_fmt(yaw['max'], '.1f')} degrees")
    metrics = summary.get("metrics") or {}
    if metrics.get("values") or metrics.get("flags"):
        table = Table(title="Data-quality metrics (KEY.json stats.metrics)")
        for column in ("metric", "n", "min", "mean", "max"):
            table.add_column(column, justify="left" if column == "metric" else "right")
        for name, d in metrics["values"].items():
            table.add_row(name, str(d["count"]), _fmt(d["min"], ".3f"), _fmt(d["mean"], ".3f"), _fmt(d["max"], ".3f"))
        # Flags: how many of the measured entries (references) each marks, then how many samples carry it.
        for name, f in metrics["flags"].items():
            table.add_row(f"{name} (flag)", str(f["of"]), "", f"{f['true']} true ({_pct(f['true'] / f['of'])})", "")
        for name, f in (metrics.get("samples_flagged") or {}).items():
            table.add_row(f"samples flagged {name}", str(f["of"]), "",
                          f"{f['true']} ({_pct(f['true'] / f['of'])})", "")
        console.print(table)


def _print_throughput(summary: dict, console: Console) -> None:
    tp = summary.get("throughput") or {}
    if not tp.get("runs"):
        console.print("Throughput: no finished run yet (a run records its throughput when it ends)")
        return
    table = Table(title="Throughput")
    for column in ("run", "mode", "CPUs", "wall s", "clips", "clips/s", "video-h/day/core"):
        table.add_column(column, justify="left" if column in ("run", "mode") else "right")
    for r in tp["runs"]:
        table.add_row(str(r["run"]), str(r["mode"]), _fmt(r["cpus"], ".0f"), _fmt(r["wall_s"], ".1f"),
                      str(r["clips"]), _fmt(r["clips_per_s"]), _fmt(r["video_hours_per_day_per_core"], ".1f"))
    t = tp["total"]
    if len(tp["runs"]) > 1:
        table.add_row("all", "", "", _fmt(t["wall_s"], ".1f"), str(t["clips"]), _fmt(t["clips_per_s"]),
                      _fmt(t["video_hours_per_day_per_core"], ".1f"))
    console.print(table)
