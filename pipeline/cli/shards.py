"""`s2v shards`: statistics, verification and contact sheets of curated output."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console

from pipeline.cli.console import err_console
from pipeline.cli.params import Location
from pipeline.core.errors import user_errors


@click.group()
def shards():
    """Inspect curated output."""


@shards.command("stats")
@click.argument("out_dirs", nargs=-1, required=True, type=Location(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a list for several directories).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Also write a self-contained HTML report with plots (funnel, distributions, filter scores).")
@user_errors
def shards_stats(out_dirs, as_json, html_path):
    """Counts, the drop funnel by stage and reason, content, reference variants, cross-pairs, clip shapes, faces
    and throughput of OUT_DIRS (several directories are added up, with a row each).

    Works on a run that is still going (it reads the commit ledger).
    """
    from pipeline.inspection.stats import combined_stats, print_stats, shard_stats

    if as_json:
        summaries = [shard_stats(d) for d in out_dirs]
        click.echo(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2))
    else:
        print_stats(shard_stats(out_dirs[0]) if len(out_dirs) == 1 else combined_stats(out_dirs), Console())
    if html_path:
        from pipeline.inspection.report import write_report

        err_console.print(f"report: {write_report(list(out_dirs), html_path)}")


@shards.command("verify")
@click.argument("out_dir", type=Location(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@user_errors
def shards_verify(out_dir, as_json):
    """Check OUT_DIR end to end: every shard readable by webdataset, sha256 and sizes as in index.json, every
    sample complete (each file its KEY.json names), manifest, ledger and shards in agreement.

    Exits 0 when all is well, 1 with the list of problems otherwise.
    """
    from pipeline.inspection.verify import print_verification, verify_output

    result = verify_output(out_dir, None if as_json else err_console)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_verification(result, Console())
    sys.exit(0 if result.ok else 1)


@shards.command("why")
@click.argument("out_dir", type=Location(exists=True))
@click.argument("name")
@user_errors
def shards_why(out_dir, name):
    """What became of one input or clip, in one line: NAME is a sample or clip key, a source id, an input's path
    or its file name. Reads the ledger, so it answers while a run is still going. Exits 1 when nothing matches.

    Every input is in OUT_DIR/sources.parquet and every planned clip in OUT_DIR/clips.parquet."""
    from pipeline.inspection.stats import StatsError
    from pipeline.store.accounting import why
    from pipeline.store.ledger import Ledger

    ledger = Ledger(out_dir)
    if not ledger.exists():
        raise StatsError(f"{out_dir}: no {ledger.name} here; is it the --output directory of an `s2v curate run`?")
    lines = why(ledger.read(), name)
    if not lines:
        click.echo(f"{name}: not in {out_dir} (no input path, file name, source id or clip key matches; a file "
                   "not yet committed, or skipped as already committed by an earlier run, is not listed)", err=True)
        sys.exit(1)
    from pipeline.core.untrusted import printable

    for line in lines:  # paths and reasons from the ledger: control characters shown escaped
        click.echo(printable(line))


@shards.command("show")
@click.argument("out_dir", type=Location(exists=True))
@click.argument("key")
@click.option("--out", "out_png", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--frames", default=6, show_default=True, help="Frames of the clip to show.")
@click.option("--width", default=1600, show_default=True, help="Width of the sheet in pixels.")
@user_errors
def shards_show(out_dir, key, out_png, frames, width):
    """A contact sheet of sample KEY (or a unique prefix of it): frames, keyframes with boxes and masks, each
    reference with its variant, word, group and origin, the background plate, and the caption with entity words
    highlighted. Works for cross-paired samples (KEY-x) too."""
    from pipeline.inspection.contact_sheet import contact_sheet

    path = contact_sheet(out_dir, key, out_png, frames=frames, width=width)
    click.echo(str(path))
