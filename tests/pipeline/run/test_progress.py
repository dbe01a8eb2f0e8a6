"""The per-stage rows under the sources bar agree with the run's funnel, and render."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from pipeline.core.config import load_config
from pipeline.run.progress import RunProgress, StageFunnel
from pipeline.store.ledger import Ledger
from pipeline.store.outputs import summarize
from stages import build_flow


def test_stage_rows_match_the_summary_funnel_of_a_real_run(curated_out):
    state = Ledger(curated_out).read()
    config = load_config(Path(__file__).resolve().parents[3] / "configs" / "quickstart.yaml", ["grounding.model.path=/unused"])
    funnel = StageFunnel([cls.name for cls in build_flow(config)])
    for entry in state.sources.values():
        funnel.add(entry)
    rows = {row["stage"]: row for row in funnel.rows()}
    steps = [step for step in summarize(state)["funnel"] if step["stage"] not in ("input", "clip_plan", "write")]
    assert steps, "the quickstart run removes something at some stage"
    for step in steps:
        assert {k: rows[step["stage"]][k] for k in ("unit", "in", "out", "removed")} == \
               {k: step[k] for k in ("unit", "in", "out", "removed")}
    assert rows["probe"]["in"] == len(state.sources) and rows["clip_extract"]["unit"] == "clips"
    assert funnel.samples == sum(len(e["samples"]) for e in state.sources.values())

    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=False)
    progress = RunProgress(funnel, console, disable=False)
    progress.add_task("curate", total=len(state.sources), completed=len(state.sources), samples=funnel.samples)
    console.print(progress)
    text = out.getvalue()
    for step in steps:
        assert step["stage"] in text and all(reason in text for reason in step["removed"])
