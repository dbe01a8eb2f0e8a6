"""Errors the person who ran a command can fix. Every module's such error (a config key, an input path, an output
directory, a shard, a job) derives from `UserFacingError`, and every command line (`s2v`, `s2v train`, `s2v curate
submit`) prints it the same way through `user_errors`: its message alone, no traceback, exit code 2."""

from __future__ import annotations

import functools

import click


class UserFacingError(Exception):
    """A problem whose message is the whole story: it names the input and the fix."""


class UserError(click.ClickException):
    """What `user_errors` raises for click: printed as `Error: <message>`, exit code 2."""

    exit_code = 2


def user_errors(fn):
    """Turn a `UserFacingError` raised by a command into a clear message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserFacingError as exc:
            raise UserError(str(exc)) from None

    return wrapper
