"""`s2v curate`: run curation here (`run`), re-filter a finished run (`refilter`), and Ray Jobs on a cluster
(`submit`, `status`, `stop`, `logs`, in pipeline/cli/jobs.py)."""

from __future__ import annotations

import click

from pipeline.cli.console import err_console
from pipeline.cli.jobs import register as register_jobs
from pipeline.cli.params import Location
from pipeline.core.errors import UserError, user_errors


@click.group()
def curate():
    """Run curation jobs."""


@curate.command("run")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML recipe (see configs/).")
@click.option("--input", "inputs", multiple=True,
              help="Video file, directory or glob, local or s3://BUCKET/PREFIX or gs://...; repeatable. Adds to "
              "input.paths.")
@click.option("--metadata", help="JSONL with per-video captions (input.metadata); a path or a URI.")
@click.option("--output", "-o", required=True, type=Location(),
              help="Output directory, or an s3:// / gs:// prefix (S3-compatible stores through AWS_ENDPOINT_URL); "
              "rerun to resume.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. shots.backend=transnetv2.")
@click.option("--address", help="Ray cluster to join (else RAY_ADDRESS, else an embedded local Ray).")
@click.option("--sequential", is_flag=True, help="Run in this process without Ray (debugging, baselines).")
@user_errors
def curate_run(config_path, inputs, metadata, output, overrides, address, sequential):
    """Curate videos into OUTPUT/shards, resuming if OUTPUT already holds a run.

    Writes shards/*.tar, index.json, manifest.parquet, errors.parquet, summary.json and config.yaml.
    Bad inputs are recorded in errors.parquet; the job goes on and exits 0.
    """
    from pipeline.core.config import load_config
    from pipeline.run.runner import curate as run_curation

    extra = list(overrides)
    config = load_config(config_path, extra)
    config.input.paths = list(config.input.paths) + list(inputs)
    if metadata:
        config.input.metadata = metadata
    if address:
        config.ray.address = address
    if not config.input.paths:
        raise UserError("no inputs: pass --input PATH (file, directory or glob) or set input.paths in the config")
    summary = run_curation(config, output, console=err_console, sequential=sequential)
    run = summary["this_run"]
    did = (f"{run['sources']} sources -> {run['samples']} samples in {run['wall_s']:.1f} s "
           f"({run['clips_per_s']:.2f} clips/s)") if run else "nothing new to process"
    err_console.print(
        f"[bold green]done[/]: {did}; {summary['samples']} samples in {summary['shards']} shards in total. "
        f"Details: s2v shards stats {output}"
    )


@curate.command("refilter")
@click.argument("run_dir", type=Location(exists=True))
@click.option("--output", "-o", required=True, type=Location(),
              help="New directory (or s3:// / gs:// prefix) for the result.")
@click.option("--set", "overrides", multiple=True, metavar="filters.KEY=VALUE",
              help="A new threshold, e.g. filters.instances.min_area=0.05; repeatable.")
@user_errors
def curate_refilter(run_dir, output, overrides):
    """Re-apply new filter thresholds to the finished run in RUN_DIR, from its stored stats, without any model.

    Writes a complete output directory (shards, index, manifest, summary, cross-pairs) to OUTPUT; RUN_DIR is
    not changed. Only tightens: clips the first run dropped have no shard to come back from.
    """
    from pipeline.postpass.refilter import refilter

    summary = refilter(run_dir, output, list(overrides), console=err_console)
    line = summary["refilter"]
    err_console.print(f"[bold green]done[/]: {line['kept']} samples kept, {sum(line['dropped'].values())} dropped. "
                      f"Details: s2v shards stats {output}")




register_jobs(curate)
