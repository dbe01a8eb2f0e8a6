"""Command-line parameter types shared by the commands."""

from __future__ import annotations

import os

import click

from pipeline.core.storage import StorageError, check_uri, is_remote


class Location(click.ParamType):
    """A local path or an s3:// / gs:// URI (pipeline/core/storage.py). A local directory that must exist is checked
    here; an object-store prefix is checked by the command that opens it (a listing, which a typo'd bucket fails)."""

    name = "PATH|URI"

    def __init__(self, exists: bool = False):
        self.exists = exists

    def convert(self, value, param, ctx):
        what = param.opts[0] if param is not None and param.opts else "path"
        try:
            uri = check_uri(value, what)
        except StorageError as exc:
            self.fail(str(exc), param, ctx)
        if is_remote(uri):
            return uri
        if self.exists and not os.path.isdir(uri):
            self.fail(f"directory {value!r} does not exist", param, ctx)
        return value
