"""`s2v demo-data`: the offline demo corpus."""

from __future__ import annotations

import click

from pipeline.cli.console import err_console


@click.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--videos", default=6, show_default=True, help="Number of videos.")
@click.option("--seed", default=0, show_default=True)
def demo_data(out_dir, videos, seed):
    """Build the offline quickstart corpus in OUT_DIR from real photos shipped with scikit-image.

    Writes videos/*.mp4 (multi-shot, camera motion, composited subjects), metadata.jsonl (a caption per shot)
    and ground_truth.json (the true cuts).
    """
    from pipeline.sources.demo_data import build_demo_corpus

    info = build_demo_corpus(out_dir, videos=videos, seed=seed)
    err_console.print(
        f"demo corpus: {info['videos']} videos, {info['shots']} shots, {info['frames']} frames -> {out_dir}"
    )
