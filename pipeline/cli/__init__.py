"""The `s2v` command line: parses arguments and turns user errors into clear messages. Nothing imports it."""
