"""The funnel: per stage of the flow, how many units went in, came out, and were removed for which reason. One
computation for summary.json, the live rows under the progress bar, and `s2v shards stats` over several
directories.

Stage order is the flow's (stages.FLOW, recorded in each run's ledger line as `flow.stages`); a stage the recorded
flows do not name (an older run) goes after them, by name."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

FAN_OUT = "clip_extract"  # the stage that turns sources into clips: it and the stages after it count clips
BOOKENDS = ("input", "clip_plan", "write")  # the rows that are not stages


class Funnel:
    """Counts over committed source entries (ledger lines of type "source"), added one at a time."""

    def __init__(self):
        self.sources = 0
        self.clips = 0
        self.samples = 0
        self.input_removed: Counter = Counter()  # unreadable inputs and duplicates, by reason
        self.removed: dict[tuple[str, str], Counter] = defaultdict(Counter)  # (unit, stage) -> reason counts
        self._lock = threading.Lock()  # the progress display renders while the run adds

    def add(self, entry: dict) -> None:
        with self._lock:
            self.sources += 1
            if entry.get("status") != "curated":
                self.removed[("sources", entry["stage"])][entry["reason"]] += 1
                return
            for clip in entry["clips"]:
                self.clips += 1
                if clip["status"] != "kept":
                    self.removed[("clips", clip["stage"])][clip["reason"]] += 1
            self.samples += len(entry["samples"])

    def add_rows(self, rows: Iterable[dict]) -> None:
        """Add another funnel's rows (another output directory's summary)."""
        with self._lock:
            for row in rows:
                if row["stage"] == "input":
                    self.sources += row["out"]
                    self.input_removed.update(row["removed"])
                elif row["stage"] == "clip_plan":
                    self.clips += row["out"]
                elif row["stage"] == "write":
                    self.samples += row["out"]
                else:
                    self.removed[(row["unit"], row["stage"])].update(row["removed"])

    def rows(self, order: Sequence[str] = (), every_stage: bool = False) -> list[dict]:
        """[{"stage", "unit", "in", "out", "removed"}]: the inputs, the stages that removed sources, the clips
        planned, the stages that removed clips, the samples written. `every_stage`: each stage of `order` gets
        its row even when it removed nothing (the live display)."""
        rank = {stage: i for i, stage in enumerate(order)}
        with self._lock:
            removed = {key: Counter(reasons) for key, reasons in self.removed.items()}
            counts = (self.sources, self.clips, self.samples, Counter(self.input_removed))
        sources, clips, samples, input_removed = counts
        fan_out = rank.get(FAN_OUT, len(rank))
        rows = [{"stage": "input", "unit": "sources", "in": sources + sum(input_removed.values()), "out": sources,
                 "removed": dict(input_removed)}]
        remaining = sources
        for unit in ("sources", "clips"):
            if unit == "clips":
                rows.append({"stage": "clip_plan", "unit": "clips", "in": remaining, "out": clips, "removed": {}})
                remaining = clips
            shown = {stage for u, stage in removed if u == unit}
            if every_stage:
                shown |= {s for s in order if (rank[s] < fan_out) == (unit == "sources")}
            for stage in sorted(shown, key=lambda s: (rank.get(s, len(rank)), s)):
                gone = sum(removed.get((unit, stage), Counter()).values())
                rows.append({"stage": stage, "unit": unit, "in": remaining, "out": remaining - gone,
                             "removed": dict(removed.get((unit, stage), {}))})
                remaining -= gone
        rows.append({"stage": "write", "unit": "samples", "in": remaining, "out": samples, "removed": {}})
        return rows


def recorded_order(runs: Iterable[dict]) -> list[str]:
    """The stage order of the flows the runs recorded. Each flow is a subsequence of stages.FLOW, so a stage only
    one of them has goes right after the stage before it in that flow."""
    order: list[str] = []
    for run in runs:
        flow = run.get("flow") if isinstance(run, dict) else None
        stages = flow.get("stages") if isinstance(flow, dict) else None
        previous = None
        for stage in stages if isinstance(stages, list) else []:
            if not isinstance(stage, str):
                continue
            if stage not in order:
                order.insert(order.index(previous) + 1 if previous is not None else 0, stage)
            previous = stage
    return order
