"""The run's terminal display: a bar over sources, and under it one row per stage of the flow with what it took in
and what it removed (by reason) so far. Counts come from the sources committed in this run (the funnel of
pipeline.store.funnel, the one summary.json reports), so they are final numbers, not guesses about work in flight
(Ray Data's own lines show the operators in flight)."""

from __future__ import annotations

from collections import Counter

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pipeline.store.funnel import BOOKENDS, Funnel


def funnel_table(funnel: Funnel, stages: list[str]) -> Table:
    """One row per stage of the flow (`stages`, in order), those that removed nothing included."""
    table = Table.grid(padding=(0, 2))
    for row in funnel.rows(stages, every_stage=True):
        if row["stage"] in BOOKENDS:
            continue
        reasons = ", ".join(f"{reason} {n}" for reason, n in Counter(row["removed"]).most_common())
        table.add_row(f"  [cyan]{row['stage']}", f"{row['in']} {row['unit']} in", f"{row['out']} out",
                      f"[yellow]removed {reasons}" if reasons else "")
    return table


class RunProgress(Progress):
    """The sources bar with the stage funnel rendered under it."""

    def __init__(self, funnel: Funnel, stages: list[str], console: Console, disable: bool):
        self.funnel, self.stages = funnel, stages  # first: Progress renders once while it is built
        super().__init__(TextColumn("[bold blue]sources"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                         TextColumn("{task.fields[samples]} samples"), console=console, disable=disable)

    def get_renderables(self):
        yield self.make_tasks_table(self.tasks)
        yield funnel_table(self.funnel, self.stages)
