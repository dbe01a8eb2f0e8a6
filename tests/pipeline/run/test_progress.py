"""The rows under the sources bar: one per stage of the flow, in flow order, with what each removed, on a real run."""

from __future__ import annotations

import io
from pathlib import Path

from rich.console import Console

from pipeline.core.config import load_config
from pipeline.run.progress import RunProgress
from pipeline.store.funnel import Funnel
from pipeline.store.ledger import Ledger
from stages import build_flow


def test_every_stage_of_the_flow_has_a_row_with_its_removals(curated_out):
    state = Ledger(curated_out).read()
    config = load_config(Path(__file__).resolve().parents[3] / "configs" / "quickstart.yaml",
                         ["grounding.model.path=/unused"])
    stages = [cls.name for cls in build_flow(config)]
    funnel = Funnel()
    for entry in state.sources.values():
        funnel.add(entry)

    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=False)
    progress = RunProgress(funnel, stages, console, disable=False)
    progress.add_task("curate", total=len(state.sources), completed=len(state.sources), samples=funnel.samples)
    console.print(progress)
    lines = [line.strip() for line in out.getvalue().splitlines()]
    rows = [line.split()[0] for line in lines[1:] if line]
    assert rows == stages  # no bookend rows (input, clip_plan, write), every stage once, in flow order
    removed = {(u, s): r for (u, s), r in funnel.removed.items()}
    assert removed, "the quickstart run removes something at some stage"
    for (unit, stage), reasons in removed.items():
        line = next(line for line in lines if line.startswith(stage + " "))
        assert f"{unit} in" in line and all(f"{reason} {n}" in line for reason, n in reasons.items())
    probe = next(line for line in lines if line.startswith("probe "))
    assert probe.split()[1] == str(len(state.sources))
