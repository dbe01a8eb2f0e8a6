"""`s2v train` and `s2v sample`: click commands, registered on the `s2v` group by pipeline/cli/main.py.

torch is imported inside the commands, so `s2v --help` stays fast.
"""

from __future__ import annotations

from pathlib import Path

import click

from pipeline.core.errors import UserFacingError, user_errors
from pipeline.core.storage import is_remote


class TrainError(UserFacingError):
    """A problem the user can fix; printed without a traceback, exit code 2 (`user_errors`)."""


def _check_shards(shards: str | None) -> None:
    if shards is None:
        return
    if is_remote(shards):  # an object-store output: its index.json must be there
        try:
            from trainer.data import resolve_shards

            resolve_shards(shards)
        except (OSError, ValueError) as exc:
            raise TrainError(f"--shards {shards}: {exc}") from None
        return
    path = Path(shards)
    if not path.exists():
        raise TrainError(f"--shards {shards}: no such directory; run `s2v curate run ... --output OUT` first and "
                         "pass OUT/shards (or OUT)")
    if path.is_dir() and not (any(path.glob("*.tar")) or any(path.glob("shards/*.tar"))
                              or (path / "index.json").is_file()):
        raise TrainError(f"--shards {shards}: no *.tar shards in it (nor in {path / 'shards'}); "
                         "point it at the shards/ folder of a finished `s2v curate run`")


def _check_encoder(name: str, spec: str) -> None:
    """A model path that is neither `tiny`, a local directory nor a hub id in the local cache fails here."""
    if spec == "tiny":
        return
    from pipeline.core.config import ModelSpec
    from pipeline.models.loader import ModelUnavailable, resolve_model_dir

    try:
        resolve_model_dir(ModelSpec(path=spec), role=name)
    except ModelUnavailable as exc:
        raise TrainError(f"{name}.path: {exc} (or set {name}.path=tiny for a random smoke-test model)") from None


@click.command("train")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML recipe, e.g. configs/train-tiny.yaml.")
@click.option("--shards", help="Curated OUT/shards (or OUT); overrides data.shards.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), help="Run directory; overrides out_dir.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. optim.lr=3e-4.")
@click.option("--resume/--no-resume", default=True, show_default=True,
              help="Continue from the newest checkpoint in the run directory.")
@user_errors
def train(config_path, shards, out_dir, overrides, resume):
    """Train the S2V DiT with flow matching straight from curated shards.

    \b
    Writes OUT/config.yaml, OUT/metrics.jsonl and OUT/checkpoints/step-NNNNNNN/.
    Multi-GPU: torchrun --nproc_per_node 8 -m trainer.cli --config ... --set dist.mode=fsdp2
    """
    from pipeline.core.config import ConfigError
    from trainer.config import load_train_config

    _check_shards(shards)
    extra = list(overrides) + ([f"out_dir={out_dir}"] if out_dir else [])
    try:
        cfg = load_train_config(config_path, extra, shards=shards)
    except ConfigError as exc:
        raise TrainError(str(exc)) from None
    _check_shards(cfg.data.shards if isinstance(cfg.data.shards, str) else None)
    _check_encoder("vae", cfg.vae.path)
    _check_encoder("text", cfg.text.path)
    if not resume and Path(cfg.out_dir, "checkpoints").is_dir() and any(Path(cfg.out_dir, "checkpoints").iterdir()):
        raise TrainError(f"{cfg.out_dir} already holds checkpoints and --no-resume was given: pick another --out "
                         "or delete them")

    from trainer.train import RunError, Trainer

    try:
        trainer = Trainer(cfg, resume=resume, log=click.echo)
        metrics = trainer.run()
    except (FileNotFoundError, RunError) as exc:  # missing shards (the loader names them), a run set up wrong
        raise TrainError(str(exc)) from None
    if metrics and trainer.is_main:
        click.echo(f"done: step {metrics['step']}, loss {metrics['loss']:.4f}; "
                   f"checkpoints in {cfg.out_dir}/checkpoints")
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


@click.command("sample")
@click.option("--checkpoint", required=True, type=click.Path(exists=True, file_okay=False),
              help="A run directory (its newest checkpoint) or one checkpoints/step-NNNNNNN.")
@click.option("--shards", help="Shards to take the conditioning sample from (default: the run's data.shards).")
@click.option("--key", help="The sample key whose references and caption condition the preview (default: the first).")
@click.option("--out", "out_path", default="preview.mp4", show_default=True, type=click.Path(dir_okay=False))
@click.option("--steps", type=int, help="Euler steps (default: the run's sample.steps).")
@click.option("--seed", type=int, help="Noise seed (default: the run's sample.seed).")
@user_errors
def sample(checkpoint, shards, key, out_path, steps, seed):
    """Write a preview mp4 sampled with the EMA weights of CHECKPOINT."""
    _check_shards(shards)
    from trainer.sample import sample_preview

    try:
        sample_preview(checkpoint, out_path, shards=shards, key=key, steps=steps, seed=seed, log=click.echo)
    except (FileNotFoundError, KeyError) as exc:
        raise TrainError(str(exc).strip("'\"")) from None


if __name__ == "__main__":  # torchrun -m trainer.cli ...: one process per rank
    train()
