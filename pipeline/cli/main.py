"""The `s2v` command line: one module per command group in this folder, gathered here."""

from __future__ import annotations

import sys

import click

from pipeline import __version__
from pipeline.cli.curate import curate
from pipeline.cli.demo import demo_data
from pipeline.cli.models import models
from pipeline.cli.shards import shards
from pipeline.cli.shots import shots
from trainer.cli import sample, train


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="s2v")
def main():
    """s2v-curate: turn raw videos into WebDataset shards for subject-to-video training.

    \b
    Typical session:
      s2v demo-data demo                      # offline demo corpus
      s2v curate run --config configs/quickstart.yaml --input demo/videos --output out
      s2v shards stats out
    """


for command in (curate, shards, shots, models, demo_data, train, sample):  # train, sample: trainer/cli.py
    main.add_command(command)

if __name__ == "__main__":
    sys.exit(main())
