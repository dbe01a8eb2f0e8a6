"""`s2v shards stats DIR... --html report.html`: one self-contained HTML file with the numbers and the plots.

Plots are matplotlib figures (Agg, no pyplot state) inlined as base64 PNG; the page has no script and no external
style sheet, so it opens anywhere, offline, and can be mailed as one file. The data is what
`pipeline/inspection/stats.py` loads: the ledger (committed state only, so a running job can be reported on) and
each committed sample's KEY.json.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from pipeline.core.storage import name as name_of
from pipeline.inspection.stats import RunData, SampleFacts, clip_values, combine, load_run, pooled_facts

# Sections in page order; "metrics" appears only when some sample has KEY.json stats.metrics.
SECTIONS = ("overview", "funnel", "inputs", "categories", "attributes", "entities", "variants", "cross-pairs", "clips",
            "faces", "quality-filter", "instance-filter", "throughput", "metrics")
THRESHOLD = {"color": "#d62728", "linestyle": "--", "linewidth": 1.5}
VALID, REJECTED = "#1f77b4", "#ff7f0e"
DPI = 90
TOP_N = 20

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; padding-top: .6em; }
table { border-collapse: collapse; margin: .5em 0 1em; font-size: .9em; }
td, th { border: 1px solid #ccc; padding: .2em .6em; text-align: right; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; display: block; margin: .4em 0; }
p.how { color: #444; font-size: .92em; max-width: 60em; }
.note { color: #8a5300; }
nav a { margin-right: .8em; }
"""


# ---------------------------------------------------------------------------------------------------------------
# Plot helpers


def _tex(text) -> str:
    """Matplotlib reads `$...$` as math: a category or reason with a dollar sign must not switch it on."""
    return str(text).replace("$", r"\$")


def _figure(ncols: int = 1, nrows: int = 1, width: float = 10.0, height: float = 3.2):
    fig = Figure(figsize=(width, height * nrows), dpi=DPI, layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, [ax for row in axes for ax in row]


def _png(fig: Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return base64.b64encode(buf.getvalue()).decode()


def _no_data(ax, title: str, text: str = "no data") -> None:
    ax.set_title(_tex(title), fontsize=10)
    ax.text(0.5, 0.5, _tex(text), ha="center", va="center", transform=ax.transAxes, color="#888")
    ax.set_xticks([])
    ax.set_yticks([])


def _thresholds(ax, lines: list[tuple[float | None, str]]) -> None:
    """Vertical threshold lines; each labelled one gets the next dash style (two thresholds at one value stay
    distinguishable), an unlabelled one ("_", e.g. the -max_yaw of a +-max_yaw rule) repeats the previous."""
    styles = ("--", ":", "-.")
    i = -1
    for value, label in lines:
        if value is None:
            continue
        if not label.startswith("_") or i < 0:
            i += 1
        ax.axvline(value, label=_tex(label), **{**THRESHOLD, "linestyle": styles[i % len(styles)]})


def _hist(ax, groups: dict[str, list[float]], title: str, xlabel: str, lines=(), colors=None, bins: int = 20,
          note: str = "no data") -> None:
    """A histogram of one value, stacked by group (validity, directory), with threshold lines."""
    groups = {k: v for k, v in groups.items() if len(v)}
    if not groups:
        # No axis to draw a line on: the thresholds go into the text.
        limits = "\n".join(label for v, label in lines if v is not None and not label.startswith("_"))
        _no_data(ax, title, f"{note}\n{limits}" if limits else note)
        return
    values = np.concatenate([np.asarray(v, float) for v in groups.values()])
    edges_from = [v for v, _ in lines if v is not None] + [float(values.min()), float(values.max())]
    low, high = min(edges_from), max(edges_from)
    if high == low:
        low, high = low - 0.5, high + 0.5
    edges = np.linspace(low, high, bins + 1)
    ax.hist([np.asarray(v, float) for v in groups.values()], bins=edges, stacked=True,
            label=[_tex(k) for k in groups], color=[colors[k] for k in groups] if colors else None)
    _thresholds(ax, list(lines))
    ax.set_title(_tex(title), fontsize=10)
    ax.set_xlabel(_tex(xlabel), fontsize=9)
    ax.set_ylabel("count", fontsize=9)
    if len(groups) > 1 or any(v is not None for v, _ in lines):
        ax.legend(fontsize=8)


def _hbars(ax, counts: dict[str, int], title: str, overlay: dict[str, int] | None = None,
           overlay_label: str = "") -> None:
    if not counts:
        _no_data(ax, title)
        return
    names = list(counts)[:TOP_N][::-1]
    y = np.arange(len(names))
    ax.barh(y, [counts[n] for n in names], color="#9ecae1", label="all")
    if overlay is not None:
        ax.barh(y, [overlay.get(n, 0) for n in names], height=0.5, color=VALID, label=_tex(overlay_label))
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(y, [_tex(n) for n in names], fontsize=8)
    ax.set_title(_tex(title), fontsize=10)


# ---------------------------------------------------------------------------------------------------------------
# Figures


def funnel_figure(summary: dict) -> str:
    fig, (left, right) = _figure(2, width=11, height=max(2.8, 0.35 * len(summary["funnel"]) + 1.2))
    steps = summary["funnel"]
    labels = [f"{s['stage']} ({s['unit']})" for s in steps][::-1]
    y = np.arange(len(steps))
    left.barh(y, [s["in"] for s in steps][::-1], color="#c6dbef", label="in")
    left.barh(y, [s["out"] for s in steps][::-1], height=0.5, color=VALID, label="out")
    left.set_yticks(y, labels, fontsize=8)
    left.set_title("units in and out of each step", fontsize=10)
    left.legend(fontsize=8)
    removed = [s for s in steps if s["removed"]]
    if not removed:
        _no_data(right, "removed by stage and reason", "nothing removed")
    else:
        reasons = sorted({r for s in removed for r in s["removed"]})
        y = np.arange(len(removed))
        start = np.zeros(len(removed))
        cmap = matplotlib.colormaps["tab20"]
        for i, reason in enumerate(reasons):
            n = np.array([s["removed"].get(reason, 0) for s in removed], float)
            right.barh(y, n, left=start, label=_tex(reason), color=cmap(i % 20))
            start += n
        right.set_yticks(y, [f"{s['stage']} ({s['unit']})" for s in removed], fontsize=8)
        right.invert_yaxis()
        right.set_title("removed by stage and reason", fontsize=10)
        right.legend(fontsize=7, loc="best")
    return _png(fig)


def categories_figure(content: dict) -> str:
    fig, (ax,) = _figure(width=10, height=max(2.5, 0.28 * min(TOP_N, len(content["categories"])) + 1))
    _hbars(ax, content["categories"], f"entities by category (kind), top {TOP_N}",
           overlay=content["categories_with_references"], overlay_label="with a reference")
    return _png(fig)


def attributes_figure(content: dict) -> str:
    fig, (ax,) = _figure(width=10, height=max(2.5, 0.28 * min(TOP_N, len(content["attributes"])) + 1))
    _hbars(ax, content["attributes"], f"subject attribute words (slot: word), top {TOP_N}")
    return _png(fig)


def entities_figure(content: dict) -> str:
    fig, (ax,) = _figure(width=10, height=3.2)
    per = content["per_sample"]
    ns = sorted({int(k) for c in per.values() for k in c})
    if not ns:
        _no_data(ax, "entities, references and subjects per sample")
        return _png(fig)
    x = np.arange(len(ns))
    for i, name in enumerate(("entities", "references", "subjects")):
        ax.bar(x + (i - 1) * 0.27, [per[name].get(str(n), 0) for n in ns], width=0.27, label=name)
    ax.set_xticks(x, [str(n) for n in ns])
    ax.set_xlabel("N per sample", fontsize=9)
    ax.set_ylabel("samples", fontsize=9)
    ax.set_title("entities, references and subjects per sample", fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)


def variants_figure(mix: list[dict]) -> str:
    fig, (ax,) = _figure(width=8, height=3.2)
    if not mix:
        _no_data(ax, "reference variant mix")
        return _png(fig)
    x = np.arange(len(mix))
    for i, (key, label) in enumerate((("configured", "configured ratio"), ("requested_share", "drawn by the ratio"),
                                      ("made_share", "made"))):
        ax.bar(x + (i - 1) * 0.27, [100 * m[key] for m in mix], width=0.27, label=label)
    ax.set_xticks(x, [m["variant"] for m in mix])
    ax.set_ylabel("% of references", fontsize=9)
    ax.set_title("reference variant mix against the configured references.ratio", fontsize=10)
    ax.legend(fontsize=8)
    return _png(fig)


def cross_figure(share: dict) -> str:
    fig, (left, right) = _figure(2, width=10, height=3.0)
    configured = share["configured"]
    left.bar(["own", "cross-paired"], [share["own"], share["cross"]], color=[VALID, REJECTED])
    left.set_ylabel("samples", fontsize=9)
    title = f"cross-paired share {100 * share['share']:.1f} %"
    if configured is not None:
        title += f" (cross_pairs.share {100 * configured:.0f} %)"
        total = share["own"] + share["cross"]
        if total:
            # The count the configured share asks for, as a line over the cross bar.
            left.axhline(configured * total, label="configured share of all samples", **THRESHOLD)
            left.legend(fontsize=8)
    left.set_title(title if share["built"] else title + ": no cross pass yet", fontsize=10)
    if share["kinds"]:
        kinds = dict(sorted(share["kinds"].items()))
        right.bar(list(kinds), list(kinds.values()), color="#9467bd")
        right.set_title("replaced references by kind", fontsize=10)
    else:
        _no_data(right, "replaced references by kind")
    return _png(fig)


def _per_dir(runs: list[RunData], values) -> dict[str, list[float]]:
    """One group per directory when there are several (stacked bars show who contributes what)."""
    if len(runs) == 1:
        return {"samples": values(runs[0])}
    return {name_of(r.out_dir) or r.out_dir: values(r) for r in runs}


def clips_figure(runs: list[RunData], summary: dict) -> str:
    fig, (dur, fps, res) = _figure(3, width=12, height=3.2)
    _hist(dur, _per_dir(runs, lambda r: clip_values(r.rows)["duration_s"]), "clip duration", "seconds")
    for ax, counts, title in ((fps, summary["clip_shapes"]["fps"], "frame rate (fps)"),
                              (res, summary["clip_shapes"]["resolutions"], "resolution (width x height)")):
        if counts:
            ax.bar(list(counts)[:TOP_N], list(counts.values())[:TOP_N], color=VALID, width=0.5)
            ax.tick_params(axis="x", labelsize=8, rotation=30)
            ax.set_title(title, fontsize=10)
            ax.set_ylabel("clips", fontsize=9)
        else:
            _no_data(ax, title)
    return _png(fig)


def faces_figure(facts: SampleFacts, limits: dict) -> str:
    faces = facts.faces
    fig, (score, yaw, pitch) = _figure(3, width=12, height=3.2)
    inst = limits["instances"]
    face = limits["faces"]
    _hist(score, {"faces": faces["score"]}, "face detection score", "score",
          [(face.get("min_score"), f"faces.min_score = {face.get('min_score')}"),
           (inst.get("min_face_score"), f"instances.min_face_score = {inst.get('min_face_score')}")])
    for ax, name, limit in ((yaw, "yaw", "max_yaw"), (pitch, "pitch", "max_pitch")):
        bound = face.get(limit)
        lines = [(bound, f"frontal: |{name}| <= {bound}"), (-bound, "_")] if bound is not None else []
        _hist(ax, {"faces": faces[name]}, f"head pose: {name}", "degrees", lines)
    return _png(fig)


def quality_figure(rows: list[dict], limits: dict) -> str:
    q = limits["quality"]
    clips = clip_values(rows)
    fig, (bright, sharp) = _figure(2, width=11, height=3.2)
    _hist(bright, {"kept clips": clips["brightness"]}, "quality filter: brightness (mean luma of the keyframes)",
          "brightness 0-255", [(q.get("min_brightness"), f"min_brightness = {q.get('min_brightness')}"),
                               (q.get("max_brightness"), f"max_brightness = {q.get('max_brightness')}")])
    _hist(sharp, {"kept clips": clips["sharpness"]}, "quality filter: sharpness (median Laplacian variance)",
          "sharpness", [(q.get("min_sharpness"), f"min_sharpness = {q.get('min_sharpness')}")])
    return _png(fig)


def instance_figure(facts: SampleFacts, limits: dict) -> str:
    t = limits["instances"]
    panels = [
        ("area", "instance area (fraction of the keyframe)", [("min_area", t.get("min_area")),
                                                              ("max_area", t.get("max_area"))]),
        ("max_iou", "max IoU with another entity's instance", [("max_iou", t.get("max_iou"))]),
        ("brightness", "instance brightness", [("min_brightness", t.get("min_brightness")),
                                               ("max_brightness", t.get("max_brightness"))]),
        ("sharpness", "instance sharpness", [("min_sharpness", t.get("min_sharpness"))]),
        ("clip_category", "CLIP category score", [("min_clip_score", t.get("min_clip_score"))]),
        ("face_score", "face score in the instance (humans)", [("min_face_score", t.get("min_face_score"))]),
    ]
    fig, axes = _figure(3, 2, width=12, height=2.9)
    for ax, (name, title, limits_) in zip(axes, panels):
        values, valid = (np.asarray(a) for a in facts.detections[name])
        groups = {"valid": values[valid == 1], "rejected": values[valid == 0]}
        note = "not measured (needs clip_score.model)" if name == "clip_category" else "no data"
        _hist(ax, groups, title, name, [(v, f"{k} = {v}") for k, v in limits_], {"valid": VALID, "rejected": REJECTED},
              note=note)
    return _png(fig)


def throughput_figure(tp: dict, names: dict[str, str]) -> str:
    fig, (rate, hours) = _figure(2, width=11, height=3.0)
    runs = tp["runs"]
    if not runs:
        _no_data(rate, "clips per second", "no finished run yet")
        _no_data(hours, "video-hours per day per core", "no finished run yet")
        return _png(fig)
    labels = [names.get(r["run"], str(r["run"])) for r in runs]
    for ax, key, title in ((rate, "clips_per_s", "clips per second"),
                           (hours, "video_hours_per_day_per_core", "video-hours per day per core")):
        ax.bar(labels, [r.get(key) or 0 for r in runs], color=VALID, width=0.5)
        total = tp["total"].get(key)
        if total is not None and len(runs) > 1:
            ax.axhline(total, label=f"all runs: {total:.2f}", **THRESHOLD)
            ax.legend(fontsize=8)
        ax.tick_params(axis="x", labelsize=7, rotation=30)
        ax.set_title(title, fontsize=10)
    return _png(fig)


# Per-sample summaries of stages/metrics.py are the per-reference values again, reduced: tabled, not plotted.
SUMMARY_PREFIX = "summary."


def _metric_lines(name: str, limits: dict) -> list[tuple[float | None, str]]:
    """Threshold lines for a metric histogram: the face flags' limits on the face cosine."""
    if name.split(".")[-1] != "face_cosine":
        return []
    return [(limits.get(key), f"metrics.{key} = {limits.get(key)}") for key in ("face_copy_paste", "face_mismatch")]


def metrics_figure(numbers: dict, flags: dict[str, tuple[int, int]], limits: dict | None = None,
                   samples_flagged: dict[str, tuple[int, int]] | None = None) -> str:
    """A histogram per metric (per-reference entries pooled; per-sample summaries left to the table) with the face
    flags' thresholds, and the share of entries (and of samples) each flag marks."""
    plotted = {k: v for k, v in numbers.items() if not k.startswith(SUMMARY_PREFIX)} or numbers
    samples_flagged = samples_flagged or {}
    bars = {**{name: share for name, share in flags.items()},
            **{f"samples: {name}": share for name, share in samples_flagged.items()}}
    panels = len(plotted) + (1 if bars else 0)
    cols = min(3, panels)
    rows = -(-panels // cols)
    fig, axes = _figure(cols, rows, width=12, height=2.9)
    for ax, (name, values) in zip(axes, plotted.items()):
        _hist(ax, {name: values}, name, "value", _metric_lines(name, limits or {}))
    if bars:
        ax = axes[len(plotted)]
        names = list(bars)
        ax.barh(names, [100 * true / of if of else 0 for true, of in bars.values()], color=REJECTED)
        ax.set_xlabel("% flagged", fontsize=9)
        ax.set_title("flags (of measured references; of samples)", fontsize=10)
        ax.tick_params(axis="y", labelsize=8)
    for ax in axes[panels:]:
        ax.set_visible(False)
    return _png(fig)


# ---------------------------------------------------------------------------------------------------------------
# HTML


def _e(x) -> str:
    return html.escape(str(x))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(data: str, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _f(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def _section(sid: str, title: str, how: str, body: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2><p class="how">{how}</p>{body}</section>'


def _overview(summary: dict) -> str:
    dirs = summary["directories"]
    rows = [[d["out_dir"], d["sources"], d["clips"], d["samples"], d["cross"], d["shards"],
             f"{d['bytes'] / 1e6:.1f}", f"{d['sample_video_hours'] * 60:.1f}",
             _f(d["video_hours_per_day_per_core"], ".1f"), d["uncommitted_shards"]] for d in dirs]
    if len(dirs) > 1:
        tp = summary["throughput"]["total"]
        rows.append(["total", summary["sources"], summary["clips"], summary["samples"],
                     summary["cross_share"]["cross"], summary["shards"], f"{summary['bytes'] / 1e6:.1f}",
                     f"{summary['sample_video_hours'] * 60:.1f}", _f(tp["video_hours_per_day_per_core"], ".1f"),
                     sum(d["uncommitted_shards"] for d in dirs)])
    table = _table(["directory", "sources", "clips", "samples", "cross-paired", "shards", "MB", "sample video min",
                    "video-h/day/core", "shards being written"], rows)
    notes = "".join(f'<p class="note">in progress: {_e(n)} is being written (or was left by a killed run); '
                    "not counted</p>" for n in summary["uncommitted_shards"])
    notes += "".join(f'<p class="note">note: {_e(p)}</p>' for p in summary["problems"])
    instances = summary.get("instances")
    if instances:
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(instances["rejected"].items())) or "-"
        notes += f"<p>Instances in the samples: {instances['valid']} valid of {instances['total']}; " \
                 f"invalid by reason: {_e(reasons)}.</p>"
    return table + notes


def _inputs(summary: dict) -> str:
    inputs = summary.get("inputs") or {"inputs": 0, "by_status": {}, "with_samples": 0, "without_samples": 0,
                                       "examples": []}
    counts = _table(["inputs", *sorted(inputs["by_status"]), "gave samples", "gave none"],
                    [[inputs["inputs"], *(inputs["by_status"][k] for k in sorted(inputs["by_status"])),
                      inputs["with_samples"], inputs["without_samples"]]])
    barren = _table(["input without samples", "status", "why", "clip outcomes"],
                    [[e["source"], e["status"], e["reason"] or "-", e["detail"] or "-"] for e in inputs["examples"]])
    more = inputs["without_samples"] - len(inputs["examples"])
    return counts + (barren if inputs["examples"] else "") + (f"<p>... and {more} more.</p>" if more > 0 else "")


def _views_table(content: dict) -> str:
    views = content.get("views_per_entity") or {}
    attributes = content.get("attribute_references") or {}
    return (_table(["views per referenced entity", *views], [["entities", *views.values()]]) if views else "") + (
        _table(["attribute references", *attributes], [["references", *attributes.values()]]) if attributes else "")


def _funnel_table(summary: dict) -> str:
    return _table(["stage", "unit", "in", "out", "removed (reason: count)"],
                  [[s["stage"], s["unit"], s["in"], s["out"],
                    ", ".join(f"{k}: {v}" for k, v in sorted(s["removed"].items())) or "-"]
                   for s in summary["funnel"]])


def write_report(out_dirs: list, html_path: str | Path) -> Path:
    """Write the statistics of one or more output directories, with plots, to ONE self-contained HTML file (no
    script, no external file). Works on a run still being written and on a run with 0 samples; raises StatsError
    for a directory without a ledger. Returns the path written."""
    runs = [load_run(d) for d in out_dirs]
    summary = combine(runs)
    facts = pooled_facts(runs)
    rows = [row for r in runs for row in r.rows]
    limits = summary["thresholds"]
    content = summary["content"]
    names = {}
    for r in runs:
        for run in r.state.runs:
            names[run["run"]] = f"{name_of(r.out_dir)}/{run['run']}" if len(runs) > 1 else run["run"]

    parts = [
        _section("overview", "Overview",
                 "What is committed now: the ledger's state, so a run still going shows what it has finished. "
                 "A shard being written is listed below and not counted.", _overview(summary)),
        _section("funnel", "Funnel by stage and drop reason",
                 "Left: how many units (sources, then clips, then samples) entered and left each step, in flow "
                 "order. Right: what each step removed, by reason. A long bar on the right is where the data goes.",
                 _img(funnel_figure(summary), "funnel") + _funnel_table(summary)),
        _section("inputs", "Inputs and what became of them",
                 "Every input of the run: committed sources by status, duplicates skipped, patterns that matched "
                 "nothing. Inputs that gave no sample are listed with the stage and reason that removed their "
                 "clips (sources.parquet holds every input, clips.parquet every planned clip; "
                 "<code>s2v shards why OUT NAME</code> answers for one).", _inputs(summary)),
        _section("categories", "Entity categories",
                 "Entities named by the captions of the samples, by taxonomy category and kind; the dark bar counts "
                 "those that got a reference image (subjects and objects with a consolidated identity).",
                 _img(categories_figure(content), "categories")),
        _section("attributes", "Subject attributes",
                 "Attribute words of the subjects (clothing, accessories, hairstyle, colours), by slot.",
                 _img(attributes_figure(content), "attributes")),
        _section("entities", "Entities per sample",
                 "How many samples have N entities, N reference images and N subjects (people); below, how many "
                 "views each referenced entity has (MV-S2V: views differ in head pose or appearance) and the "
                 "attribute references cut per part (LumosX).",
                 _img(entities_figure(content), "entities per sample") + _views_table(content)),
        _section("variants", "Reference variant mix",
                 "Share of each reference variant: configured (references.ratio, normalised), drawn by the ratio "
                 "for the samples, and made. Made differs from drawn when a variant is unavailable (redux without "
                 "redux.model and redux.base_model: its draws go to the others).",
                 _img(variants_figure(summary["variant_mix"]), "variant mix")
                 + _table(["variant", "configured", "drawn", "made", "references made"],
                          [[m["variant"], f"{100 * m['configured']:.1f} %", f"{100 * m['requested_share']:.1f} %",
                            f"{100 * m['made_share']:.1f} %", m["made"]] for m in summary["variant_mix"]])),
        _section("cross-pairs", "Cross-pair share",
                 "Own samples and cross-paired ones (references taken from another clip of the same identity, or "
                 "the subject pasted on another source's background plate). The dashed line is where the cross bar "
                 "would end at the configured cross_pairs.share; it stays short when too few samples can be paired.",
                 _img(cross_figure(summary["cross_share"]), "cross-pair share")),
        _section("clips", "Clip duration, frame rate and resolution",
                 "Of the samples (own; cross-paired samples reuse their base's clip).",
                 _img(clips_figure(runs, summary), "clips")),
        _section("faces", "Faces",
                 "Every face found on the samples' keyframes: detection score and head pose. Dashed lines are the "
                 "configured limits: faces below faces.min_score are ignored; a face is frontal when |yaw| and "
                 "|pitch| are within faces.max_yaw and faces.max_pitch.",
                 _img(faces_figure(facts, limits), "faces")),
        _section("quality-filter", "Quality filter scores",
                 "Brightness and sharpness of the kept clips with the thresholds of filters.quality (dashed). Dropped "
                 "clips store no stats, so the histogram shows what passed: mass piled against a line means the "
                 "threshold is cutting into the data; the funnel says how many were dropped for each reason.",
                 _img(quality_figure(rows, limits), "quality filter")),
        _section("instance-filter", "Instance filter scores",
                 "Every detection in the kept samples, valid (blue) or rejected (orange) by filters.instances, with "
                 "each threshold dashed. A rejected instance left of a min line (right of a max line) failed that "
                 "rule; a rejected one inside all lines failed another rule.",
                 _img(instance_figure(facts, limits), "instance filter")),
        _section("throughput", "Throughput",
                 "Per finished run: clips per wall-clock second and hours of input video per day per CPU core "
                 "(video_s / 3600 / (wall_s / 86400) / cpus). A run still going has no entry yet.",
                 _img(throughput_figure(summary["throughput"], names), "throughput")
                 + ("" if summary["throughput"]["runs"] else
                    '<p class="note">no finished run yet: a run records its throughput when it ends</p>')
                 + _table(["run", "mode", "CPUs", "wall s", "clips", "clips/s", "video-h/day/core"],
                          [[names.get(r["run"], r["run"]), r["mode"], _f(r["cpus"], ".0f"), _f(r["wall_s"], ".1f"),
                            r["clips"], _f(r["clips_per_s"]), _f(r["video_hours_per_day_per_core"], ".1f")]
                           for r in summary["throughput"]["runs"]])),
    ]
    numbers, flags = facts.metric_values()
    if numbers or flags:
        flagged = facts.flagged_samples()
        stats = [[k, len(v), _f(min(v), ".3f"), _f(float(np.mean(v)), ".3f"), _f(max(v), ".3f")]
                 for k, v in numbers.items()]
        stats += [[f"{k} (flag)", of, "", f"{true} true", ""] for k, (true, of) in flags.items()]
        stats += [[f"samples flagged {k}", of, "", f"{true}", ""] for k, (true, of) in flagged.items()]
        parts.append(_section("metrics", "Data-quality metrics",
                              "Per-sample metrics stored in KEY.json stats.metrics (pooled over references where "
                              "a sample has several; the per-sample summaries are in the table only), and the "
                              "share of those entries each true/false flag marks. Face cosine: the reference's face "
                              "against its entity's faces on the clip's other keyframes, with the copy-paste "
                              "(above) and identity-mismatch (below) thresholds; CLIP-I / DINO-I: the reference "
                              "crop against the other keyframes; background similarity: the reference's "
                              "background against the clip's plate (low = decoupled). See docs/inspecting.md.",
                              _img(metrics_figure(numbers, flags, limits.get("metrics"), flagged), "metrics")
                              + _table(["metric", "n", "min", "mean", "max"], stats)))
    present = [s for s in SECTIONS if s != "metrics" or numbers or flags]
    nav = "<nav>" + "".join(f'<a href="#{s}">{_e(s)}</a>' for s in present) + "</nav>"
    title = f"s2v shards stats: {', '.join(str(r.out_dir) for r in runs)}"
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{_e(title)}</h1>"
            f"<p>{summary['samples']} samples ({summary['cross_share']['cross']} cross-paired besides) in "
            f"{summary['shards']} shard{'s' if summary['shards'] != 1 else ''}; "
            f"{content['samples_read']} KEY.json read.</p>{nav}{''.join(parts)}</body></html>\n")
    path = Path(html_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
