"""`s2v shots`: the shot detector on one video."""

from __future__ import annotations

import json

import click

from pipeline.core.errors import user_errors


@click.command()
@click.argument("video", type=click.Path(exists=True, dir_okay=False))
@click.option("--backend", type=click.Choice(["pyscenedetect", "transnetv2"]), default="pyscenedetect",
              show_default=True)
@click.option("--threshold", type=float, help="Detector threshold (default: 27 content score / 0.5 probability).")
@click.option("--json", "as_json", is_flag=True,
              help="Print one JSON object (always the output form; kept for scripts).")
@user_errors
def shots(video, backend, threshold, as_json):
    """Detect the shots of one VIDEO: prints {fps, cuts, shots} as JSON.

    cuts are the indices of the first frame of each new shot; shots are inclusive [first, last] frame pairs.
    Use it to tune shots.threshold before a run.
    """
    from pipeline.core.config import build_config
    from pipeline.core.video import probe
    from stages.shot_cut import ShotCutter, shots_from_cuts

    overrides = [f"shots.backend={backend}"] + ([f"shots.threshold={threshold}"] if threshold is not None else [])
    cutter = ShotCutter(build_config({}, overrides))
    cutter.setup()
    info = probe(video)
    cuts, decoded, _error = cutter.detect(video, info.fps, info.width, info.height)
    shots_ = shots_from_cuts(cuts, decoded)
    click.echo(json.dumps({"fps": info.fps, "num_frames": decoded, "cuts": [s[0] for s in shots_[1:]],
                           "shots": shots_}))
