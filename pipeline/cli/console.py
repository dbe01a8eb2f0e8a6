"""Where the command line talks to people: stderr, so stdout stays clean for --json output."""

from rich.console import Console

err_console = Console(stderr=True)
