"""Ray Jobs for `s2v curate`: submit a curation to a running cluster, follow its logs, ask its status, stop it.

A submitted job is `s2v curate run` with the same options, started by Ray's job supervisor on the cluster's head
node, so it does exactly what a local run does and resumes the same way. This checkout travels with it as the job's
working directory (Ray puts it first on the job's PYTHONPATH), so the cluster runs this code; the Python
environment (torch, Ray, the `s2v` command) is the one installed on the nodes. Paths (--input, --output,
--metadata) are opened on the cluster, not here: they must name storage mounted at the same path on every node.

Ray reads the Jobs address from RAY_API_SERVER_ADDRESS / RAY_ADDRESS even over an explicit argument; here
`--address` wins, then those variables. Ray is imported only inside the functions: a client of a token-auth cluster
needs RAY_AUTH_MODE=token in its environment before `import ray`.
"""

from __future__ import annotations

import asyncio
import fnmatch
import logging
import os
import re
import shlex
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path, PurePosixPath

import yaml

from pipeline.core.errors import UserFacingError
from pipeline.core.storage import is_remote

ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
# Never worth uploading: environments, outputs, weights, the demo corpus, caches. Gitwildmatch patterns relative to
# the working directory (a leading / anchors at its top), as Ray's runtime env `excludes` takes them.
DEFAULT_EXCLUDES = ["/.venv/", "/.git/", "/out/", "/models/", "/runs/", "/demo/", "/build/",
                    "__pycache__/", "*.egg-info/", ".pytest_cache/"]
# Ray warns about files above 10 MiB in a working directory; anything that big is data, not code.
DEFAULT_MAX_FILE_MB = 10.0
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# A job's output is a log file, not a terminal: rich would wrap the driver's lines at 80 columns.
LOG_COLUMNS = "160"
AUTH_HINT = ("Token auth (Ray's default for `ray start` clusters): set RAY_AUTH_MODE=token for this command and "
             "give it the cluster's token, in ~/.ray/auth_token or through RAY_AUTH_TOKEN_PATH / RAY_AUTH_TOKEN "
             "(`ray get-auth-token` on the head prints it).")


class JobsError(UserFacingError):
    """A problem the user can fix (address, auth, paths, job id): the message is the whole story."""


def resolve_address(address: str | None) -> str:
    """--address, else RAY_API_SERVER_ADDRESS, else RAY_ADDRESS."""
    for value in (address, *(os.environ.get(name) for name in ADDRESS_ENV)):
        if value:
            return value
    raise JobsError("no cluster address: pass --address http://HEAD:8265 (the head's Ray dashboard; through "
                    "`ray dashboard ray_cluster.yaml` it is http://127.0.0.1:8265) or set RAY_API_SERVER_ADDRESS")


@contextmanager
def _address_env_cleared():
    saved = {name: os.environ.pop(name) for name in ADDRESS_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str | None):
    """A JobSubmissionClient for the cluster at `address` (see resolve_address), checked by a version request."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    # Ray's own INFO lines (each ignored file, the upload, the closed log stream) would bury ours.
    for name in ("ray", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        with _address_env_cleared():
            return JobSubmissionClient(address)
    except AuthenticationError as exc:
        raise JobsError(f"the Ray Jobs API at {address} refused this client ({first_line(exc)}). "
                        f"{AUTH_HINT}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        raise JobsError(
            f"cannot reach the Ray Jobs API at {address} ({first_line(exc)}). Check the address: the head's dashboard "
            "port, http://HEAD:8265, or http://127.0.0.1:8265 through `ray dashboard ray_cluster.yaml`. "
            "A token-auth cluster also needs RAY_AUTH_MODE=token and its token here."
        ) from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def call(what: str, job_id: str, fn, *args):
    """A client call whose failures become JobsError (an unknown job id answers HTTP 404)."""
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args)
    except AuthenticationError as exc:
        raise JobsError(f"{what} {job_id}: {first_line(exc)}. {AUTH_HINT}") from None
    except RuntimeError as exc:
        if "404" in str(exc):
            raise JobsError(f"no job {job_id!r} on this cluster (`ray job list` lists them)") from None
        raise JobsError(f"{what} {job_id}: {first_line(exc)}") from None


# ---- submit --------------------------------------------------------------------------------------------------------

def curate_entrypoint(config: str | None, inputs: list[str], metadata: str | None, output: str,
                      overrides: list[str]) -> str:
    """The shell command the job runs: `s2v curate run` with the options a local run would get."""
    args = ["s2v", "curate", "run"]
    if config:
        args += ["--config", config]
    for path in inputs:
        args += ["--input", path]
    if metadata:
        args += ["--metadata", metadata]
    args += ["--output", output]
    for item in overrides:
        args += ["--set", item]
    return shlex.join(args)


def check_cluster_paths(inputs: list[str], metadata: str | None, output: str) -> None:
    """The job's working directory is a temporary copy on the head: a relative path would point into it. URIs
    (s3://, gs://) name the same objects from every node."""
    named = [("--input", p) for p in inputs] + [("--metadata", metadata), ("--output", output)]
    relative = [f"{option} {path}" for option, path in named
                if path and not is_remote(path) and not PurePosixPath(path).is_absolute()]
    if relative:
        raise JobsError(f"{', '.join(relative)}: paths of a submitted job are opened on the cluster and must be "
                        "absolute, on storage every node mounts at the same path (e.g. /mnt/shared/videos), or "
                        "object-store URIs (s3://BUCKET/PREFIX, gs://...)")


def config_for_job(config: str | None, working_dir: Path | None) -> str | None:
    """The --config path the job gets: a local file inside the working directory travels with the job (its path
    relative to it); any other path must be absolute and exist on the cluster."""
    if not config:
        return None
    local = Path(config).expanduser()
    if working_dir is not None and local.is_file():
        try:
            return local.resolve().relative_to(working_dir.resolve()).as_posix()
        except ValueError:
            pass
    if PurePosixPath(config).is_absolute():
        return config
    where = f"inside the working directory {working_dir}" if working_dir else "uploaded (no working directory)"
    raise JobsError(f"--config {config}: not a file {where}; put the recipe there (e.g. configs/) or give an "
                    "absolute path on the cluster's shared storage")


def _scan_pruned(rel_dir: str, name: str, patterns: list[str]) -> bool:
    for pattern in patterns:
        bare = pattern.strip("/")
        anchored = pattern.startswith("/") or "/" in bare
        if fnmatch.fnmatch(rel_dir if anchored else name, bare):
            return True
    return False


def big_files(root: Path, excludes: list[str], max_mb: float) -> list[str]:
    """Files above max_mb under root, as root-anchored exclude patterns. The walk skips what `excludes` names
    (roughly: Ray applies the exact patterns), so a virtual environment is not scanned."""
    found = []
    limit = max_mb * 2**20
    for here, dirs, files in os.walk(root):
        prefix = Path(here).relative_to(root).as_posix() + "/" if Path(here) != root else ""
        dirs[:] = [d for d in dirs if not _scan_pruned(prefix + d, d, excludes)]
        for name in files:
            path = os.path.join(here, name)
            if _scan_pruned(prefix + name, name, excludes) or not os.path.isfile(path):
                continue
            if os.path.getsize(path) > limit:
                found.append("/" + prefix + name)
    return sorted(found)


def build_runtime_env(working_dir: Path | None, excludes: list[str], max_file_mb: float,
                      env_file: str | None = None, pip: list[str] = (), env_vars: dict[str, str] | None = None) -> dict:
    """The job's runtime env: the YAML/JSON file if given, then the working directory with its excludes (defaults,
    `excludes`, files above max_file_mb), extra pip packages and environment variables (COLUMNS unless set)."""
    env: dict = {}
    if env_file:
        try:
            env = yaml.safe_load(Path(env_file).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise JobsError(f"--runtime-env {env_file}: {first_line(exc)}") from None
        if not isinstance(env, dict):
            raise JobsError(f"--runtime-env {env_file}: expected a mapping (pip, env_vars, ...), "
                            f"got {type(env).__name__}")
    if working_dir is not None:
        if not working_dir.is_dir():
            raise JobsError(f"--working-dir {working_dir}: not a directory")
        patterns = DEFAULT_EXCLUDES + list(excludes)
        env["working_dir"] = str(working_dir)
        env["excludes"] = list(env.get("excludes") or []) + patterns + big_files(working_dir, patterns, max_file_mb)
    if pip:
        if not isinstance(env.get("pip") or [], list):
            raise JobsError("--pip adds to a runtime env whose `pip` is a list; "
                            "the --runtime-env file gives it another form")
        env["pip"] = list(env.get("pip") or []) + list(pip)
    env["env_vars"] = {"COLUMNS": LOG_COLUMNS, **(env.get("env_vars") or {}), **(env_vars or {})}
    return env


def default_submission_id(output: str, now: float | None = None) -> str:
    """`s2v-<output dir name>-<local time>`: readable in `ray job list` and the dashboard, unique per second."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", PurePosixPath(output.rstrip("/")).name).strip("-") or "out"
    return f"s2v-{name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


# ---- following a job -----------------------------------------------------------------------------------------------

def stream_logs(client, job_id: str, write=None) -> None:
    """Write the job's log from its start, as it grows, until the job ends (Ray closes the stream then)."""
    write = write or write_stdout

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())


def write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def wait_for(client, job_id: str, states: set[str], timeout_s: float, poll_s: float = 0.5):
    """The job's info once its status is in `states`, or the last info seen when timeout_s runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = call("status of", job_id, client.get_job_info, job_id)
        if str(info.status) in states or time.monotonic() >= deadline:
            return info
        time.sleep(poll_s)


def job_dict(info) -> dict:
    """The fields `status --json` prints; times are Unix milliseconds as Ray reports them."""
    return {
        "submission_id": info.submission_id,
        "job_id": info.job_id,
        "status": str(info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "driver_exit_code": info.driver_exit_code,
        "metadata": info.metadata or {},
    }


def _clock(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).astimezone().isoformat(sep=" ", timespec="seconds") if ms else "-"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def describe(info) -> list[str]:
    """Human lines for `status`."""
    job = job_dict(info)
    lines = [f"job         {job['submission_id']}", f"status      {job['status']}"]
    if job["message"]:
        lines.append(f"message     {job['message'].strip().splitlines()[0]}")
    lines += [f"entrypoint  {job['entrypoint']}", f"started     {_clock(job['start_time'])}"]
    if job["end_time"]:
        took = (job["end_time"] - (job["start_time"] or job["end_time"])) / 1000
        lines.append(f"ended       {_clock(job['end_time'])} (after {_duration(took)})")
    output = job["metadata"].get("s2v_output")
    if output:
        lines.append(f"output      {output}")
        if job["status"] == "SUCCEEDED" and Path(output).is_dir():
            lines.append(f"            s2v shards stats {output}")
    return lines
