"""The run's terminal display: a bar over sources, and under it one row per stage of the flow with what it took in
and what it removed (by reason) so far. Counts come from the sources committed in this run, so they are final
numbers, not guesses about work in flight (Ray Data's own lines show the operators in flight)."""

from __future__ import annotations

import threading
from collections import Counter, defaultdict

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table


class StageFunnel:
    """Per stage of the flow: units in and removed by reason, over the committed source entries added so far.
    Stages before the fan-out stage count sources; it and those after it count clips."""

    def __init__(self, stages: list[str], fan_out: str = "clip_extract"):
        self.stages = stages
        self.fan_out = fan_out
        self.sources = 0
        self.clips = 0
        self.samples = 0
        self.removed: dict[str, Counter] = defaultdict(Counter)
        self._lock = threading.Lock()  # the display thread renders while the run adds

    def add(self, entry: dict) -> None:
        with self._lock:
            self._add(entry)

    def _add(self, entry: dict) -> None:
        self.sources += 1
        if entry.get("status") != "curated":
            self.removed[entry["stage"]][entry["reason"]] += 1
            return
        for clip in entry["clips"]:
            self.clips += 1
            if clip["status"] != "kept":
                self.removed[clip["stage"]][clip["reason"]] += 1
        self.samples += len(entry["samples"])

    def rows(self) -> list[dict]:
        """[{"stage", "unit", "in", "out", "removed"}] in flow order (stages removing nothing included)."""
        rows, remaining, unit = [], self.sources, "sources"
        for stage in self.stages:
            if stage == self.fan_out:
                remaining, unit = self.clips, "clips"
            gone = sum(self.removed[stage].values())
            rows.append({"stage": stage, "unit": unit, "in": remaining, "out": remaining - gone,
                         "removed": dict(self.removed[stage])})
            remaining -= gone
        return rows

    def table(self) -> Table:
        table = Table.grid(padding=(0, 2))
        with self._lock:
            rows = self.rows()
        for row in rows:
            reasons = ", ".join(f"{reason} {n}" for reason, n in Counter(row["removed"]).most_common())
            table.add_row(f"  [cyan]{row['stage']}", f"{row['in']} {row['unit']} in", f"{row['out']} out",
                          f"[yellow]removed {reasons}" if reasons else "")
        return table


class RunProgress(Progress):
    """The sources bar with the stage funnel rendered under it."""

    def __init__(self, funnel: StageFunnel, console: Console, disable: bool):
        self.funnel = funnel  # first: Progress renders once while it is built
        super().__init__(TextColumn("[bold blue]sources"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         TextColumn("{task.fields[samples]} samples"), console=console, disable=disable)

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        yield self.funnel.table()
