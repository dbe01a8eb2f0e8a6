"""A real S3-compatible HTTP server on 127.0.0.1 for tests and benchmarks: moto's server mode, one process per use.

    with S3Server() as server:                     # sets AWS_ENDPOINT_URL, AWS_REGION and keys in os.environ
        server.create_bucket("videos")
        curate(config, "s3://videos/out")          # every S3 request goes over HTTP to the server

The keys are random per server, so a test can look for the secret in every log and output file and prove it never
leaks. The environment is restored on exit.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Self

from pipeline.testing.loopback import free_port

ENV_KEYS = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ALLOW_HTTP",
            "AWS_EC2_METADATA_DISABLED")


class S3Server:
    def __init__(self, log: Path | None = None, start_timeout_s: float = 60.0):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.secret = "s2v-test-secret-" + secrets.token_hex(12)
        self.key_id = "S2VTEST" + secrets.token_hex(6).upper()
        self.log = log
        self.start_timeout_s = start_timeout_s
        self._process: subprocess.Popen | None = None
        self._saved: dict[str, str | None] = {}

    @property
    def env(self) -> dict[str, str]:
        """What a process needs to reach this server: the standard AWS variables, nothing else."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": self.key_id,
                "AWS_SECRET_ACCESS_KEY": self.secret, "AWS_EC2_METADATA_DISABLED": "true"}

    def __enter__(self) -> Self:
        out = open(self.log, "wb") if self.log else subprocess.DEVNULL  # noqa: SIM115 - closed with the process
        self._process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__(None, None, None)
                    raise RuntimeError(f"the S3 test server (moto) did not start on port {self.port}") from None
                time.sleep(0.2)
        for key, value in self.env.items():
            self._saved[key] = os.environ.get(key)
            os.environ[key] = value
        return self

    def __exit__(self, *exc) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def create_bucket(self, name: str) -> str:
        """Make a bucket; returns `s3://name`."""
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id=self.key_id,
                     aws_secret_access_key=self.secret).create_bucket(Bucket=name)
        return f"s3://{name}"

    def upload_tree(self, local: str | Path, uri: str) -> list[str]:
        """Copy every file below `local` to `uri` (through the product's own storage layer); returns the URIs."""
        from pipeline.core.storage import open_storage

        root, target = Path(local), open_storage(uri)
        made = []
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root).as_posix()
            target.write_bytes(rel, path.read_bytes())
            made.append(target.join(rel))
        return made


def main() -> None:  # pragma: no cover - a manual harness
    """`python -m pipeline.testing.s3server [--bucket NAME ...] [--upload DIR s3://BUCKET/PREFIX]`: a server to try
    the commands against; Ctrl-C stops it."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--bucket", action="append", default=[], help="create this bucket (repeatable)")
    parser.add_argument("--upload", nargs=2, action="append", default=[], metavar=("DIR", "URI"),
                        help="copy a local directory's files under a URI (repeatable)")
    args = parser.parse_args()
    with S3Server() as server:
        for bucket in args.bucket:
            server.create_bucket(bucket)
        for local, uri in args.upload:
            server.upload_tree(local, uri)
        print("S3-compatible server running; in another shell:")
        for key, value in server.env.items():
            print(f"  export {key}={value}")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
