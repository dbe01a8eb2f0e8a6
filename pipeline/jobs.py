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
import json
import logging
import os
import re
import shlex
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path, PurePosixPath

import click
import yaml

ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
PROJECT_ROOT = Path(__file__).resolve().parents[1]
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


class JobsError(Exception):
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
        raise JobsError(f"the Ray Jobs API at {address} refused this client ({_first_line(exc)}). "
                        f"{AUTH_HINT}") from None
    except (OSError, RuntimeError, ValueError) as exc:
        raise JobsError(
            f"cannot reach the Ray Jobs API at {address} ({_first_line(exc)}). Check the address: the head's dashboard "
            "port, http://HEAD:8265, or http://127.0.0.1:8265 through `ray dashboard ray_cluster.yaml`. "
            "A token-auth cluster also needs RAY_AUTH_MODE=token and its token here."
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _call(what: str, job_id: str, fn, *args):
    """A client call whose failures become JobsError (an unknown job id answers HTTP 404)."""
    from ray.exceptions import AuthenticationError

    try:
        return fn(*args)
    except AuthenticationError as exc:
        raise JobsError(f"{what} {job_id}: {_first_line(exc)}. {AUTH_HINT}") from None
    except RuntimeError as exc:
        if "404" in str(exc):
            raise JobsError(f"no job {job_id!r} on this cluster (`ray job list` lists them)") from None
        raise JobsError(f"{what} {job_id}: {_first_line(exc)}") from None


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
    """The job's working directory is a temporary copy on the head: a relative path would point into it."""
    named = [("--input", p) for p in inputs] + [("--metadata", metadata), ("--output", output)]
    relative = [f"{option} {path}" for option, path in named if path and not PurePosixPath(path).is_absolute()]
    if relative:
        raise JobsError(f"{', '.join(relative)}: paths of a submitted job are opened on the cluster and must be "
                        "absolute, on storage every node mounts at the same path (e.g. /mnt/shared/videos)")


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
            raise JobsError(f"--runtime-env {env_file}: {_first_line(exc)}") from None
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
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", PurePosixPath(output).name).strip("-") or "out"
    return f"s2v-{name}-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now))}"


# ---- following a job -----------------------------------------------------------------------------------------------

def stream_logs(client, job_id: str, write=None) -> None:
    """Write the job's log from its start, as it grows, until the job ends (Ray closes the stream then)."""
    write = write or _write_stdout

    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)

    asyncio.run(tail())


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def wait_for(client, job_id: str, states: set[str], timeout_s: float, poll_s: float = 0.5):
    """The job's info once its status is in `states`, or the last info seen when timeout_s runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = _call("status of", job_id, client.get_job_info, job_id)
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


# ---- the commands --------------------------------------------------------------------------------------------------

def _address_option(fn):
    return click.option(
        "--address", envvar=list(ADDRESS_ENV), show_envvar=True,
        help="Ray Jobs API of the cluster: the head's dashboard, http://HEAD:8265 (http://127.0.0.1:8265 through "
             "`ray dashboard ray_cluster.yaml`).",
    )(fn)


def _parse_env_vars(items: tuple[str, ...]) -> dict[str, str]:
    pairs = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise JobsError(f"--env {item!r}: expected KEY=VALUE")
        pairs[key] = value
    return pairs


def register(curate_group: click.Group) -> None:
    """Add `submit`, `status`, `stop` and `logs` to the `s2v curate` click group."""
    from rich.markup import escape

    from pipeline.cli import UserError, err_console

    def user_errors(fn):
        from functools import wraps

        from pipeline.config import ConfigError

        @wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except (JobsError, ConfigError) as exc:
                raise UserError(str(exc)) from None

        return wrapper

    def finish(client, job_id: str, info) -> None:
        status = str(info.status)
        if status == "SUCCEEDED":
            err_console.print(f"[bold green]job {job_id} SUCCEEDED[/]")
            return
        if status in TERMINAL:
            # FAILED's message repeats the log tail that was just streamed: its first line says enough.
            first = (info.message or "").strip().splitlines()
            why = f": {escape(first[0])}" if first else ""
            err_console.print(f"[bold red]job {job_id} {status}[/]{why}", soft_wrap=True)
        else:
            err_console.print(f"[yellow]job {job_id} is {status}[/]: the log stream closed before it ended; "
                              f"follow it with `s2v curate logs {job_id} --follow`")
        sys.exit(1)

    @curate_group.command("submit")
    @click.option("--config", "config_path", help="YAML recipe: a file inside the working directory travels with "
                  "the job (e.g. configs/gpu-cluster.yaml); any other path is read on the cluster.")
    @click.option("--input", "inputs", multiple=True, help="Video file, directory or glob on the cluster's shared "
                  "storage (absolute); repeatable.")
    @click.option("--metadata", help="JSONL with per-video captions, on the cluster's shared storage (absolute).")
    @click.option("--output", "-o", required=True, help="Output directory on the cluster's shared storage "
                  "(absolute), written by the driver on the head; resubmit with the same --output to resume.")
    @click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config key; repeatable.")
    @_address_option
    @click.option("--working-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
                  help="Directory uploaded as the job's working directory [default: this s2v-curate checkout].")
    @click.option("--no-working-dir", is_flag=True, help="Upload nothing: run the s2v-curate installed on the nodes.")
    @click.option("--exclude", "excludes", multiple=True, metavar="PATTERN",
                  help="Also leave out of the upload (gitignore syntax); repeatable. Always left out: "
                  + ", ".join(DEFAULT_EXCLUDES) + ".")
    @click.option("--max-file-mb", type=float, default=DEFAULT_MAX_FILE_MB, show_default=True,
                  help="Leave files larger than this out of the upload.")
    @click.option("--runtime-env", "env_file", type=click.Path(exists=True, dir_okay=False),
                  help="YAML/JSON Ray runtime env (pip, env_vars, ...) to start from.")
    @click.option("--pip", multiple=True, metavar="REQUIREMENT", help="Extra pip package for the job; repeatable.")
    @click.option("--env", "env_items", multiple=True, metavar="KEY=VALUE",
                  help="Environment variable for the job and its workers; repeatable.")
    @click.option("--submission-id", help="Job id [default: s2v-<output name>-<time>]; must be new to the cluster.")
    @click.option("--no-wait", is_flag=True, help="Print the job id and return instead of streaming the logs.")
    @user_errors
    def submit(config_path, inputs, metadata, output, overrides, address, working_dir, no_working_dir, excludes,
               max_file_mb, env_file, pip, env_items, submission_id, no_wait):
        """Run `s2v curate run` on a Ray cluster as a Ray job and stream its log.

        PATHS ARE THE CLUSTER'S: --input, --metadata and --output name shared storage (an NFS/EFS/FSx mount at the
        same path on every node), not files on this machine. This checkout is uploaded as the job's working
        directory, so the cluster runs this code (see docs/cluster.md).

        Prints the job id; exits 0 when the job SUCCEEDED, 1 when it FAILED or was STOPPED. Ctrl-C stops
        following, not the job (`s2v curate stop JOB` does).
        """
        from pipeline.config import load_config

        if working_dir is None and not no_working_dir:
            # An installed wheel has no checkout around it: then the nodes' own installation runs.
            working_dir = PROJECT_ROOT if (PROJECT_ROOT / "pyproject.toml").is_file() else None
        if no_working_dir:
            working_dir = None
        if not inputs and not config_path:
            raise JobsError("no inputs: pass --input PATH (absolute, on the cluster's shared storage) or a --config "
                            "with input.paths")
        check_cluster_paths(list(inputs), metadata, output)
        job_config = config_for_job(config_path, working_dir)
        if config_path is None or Path(config_path).expanduser().is_file():
            load_config(config_path, list(overrides))  # a config error stops here, before anything is uploaded
        runtime_env = build_runtime_env(working_dir, list(excludes), max_file_mb, env_file, list(pip),
                                        _parse_env_vars(env_items))
        entrypoint = curate_entrypoint(job_config, list(inputs), metadata, output, list(overrides))
        client = connect(address)
        submission_id = submission_id or default_submission_id(output)
        if working_dir is not None:
            err_console.print(f"uploading {working_dir} as the job's working directory")
        try:
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, submission_id=submission_id,
                                       metadata={"s2v_output": output, "s2v_command": "curate run"})
        except (RuntimeError, ValueError) as exc:
            raise JobsError(f"the cluster did not accept the job: {_first_line(exc)}") from None
        err_console.print(f"submitted job [bold]{job_id}[/] to {client.get_address()}: {escape(entrypoint)}",
                          soft_wrap=True)
        err_console.print(f"  s2v curate status {job_id} | s2v curate logs {job_id} --follow | "
                          f"s2v curate stop {job_id}", soft_wrap=True)
        if no_wait:
            click.echo(job_id)
            return
        try:
            stream_logs(client, job_id)
        except KeyboardInterrupt:
            err_console.print(f"\nstopped following; job {job_id} keeps running on the cluster")
            sys.exit(130)
        except RuntimeError as exc:
            err_console.print(f"[yellow]log stream ended early[/]: {_first_line(exc)}")
        finish(client, job_id, wait_for(client, job_id, TERMINAL, timeout_s=30))

    @curate_group.command("status")
    @click.argument("job_id")
    @_address_option
    @click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
    @user_errors
    def status(job_id, address, as_json):
        """State, message and times of a submitted job.

        JOB_ID is what `submit` printed (or any id from `ray job list`). For a job that SUCCEEDED, names the
        `s2v shards stats` command when its output directory is mounted here too.
        """
        client = connect(address)
        info = _call("status of", job_id, client.get_job_info, job_id)
        if as_json:
            click.echo(json.dumps(job_dict(info), indent=2))
        else:
            click.echo("\n".join(describe(info)))

    @curate_group.command("stop")
    @click.argument("job_id")
    @_address_option
    @click.option("--timeout", "timeout_s", type=float, default=60, show_default=True,
                  help="Seconds to wait for the job to reach STOPPED.")
    @user_errors
    def stop(job_id, address, timeout_s):
        """Stop a submitted job and wait until it is STOPPED.

        The driver gets SIGTERM (SIGKILL a few seconds later); what it had committed stays in the output
        directory, and resubmitting with the same --output resumes from there.
        """
        client = connect(address)
        if not _call("stop", job_id, client.stop_job, job_id):
            info = _call("status of", job_id, client.get_job_info, job_id)
            err_console.print(f"job {job_id} had already ended: {info.status}")
            return
        info = wait_for(client, job_id, TERMINAL, timeout_s)
        if str(info.status) not in TERMINAL:
            raise JobsError(f"job {job_id} is still {info.status} {timeout_s:.0f} s after the stop request; "
                            "check `ray job list` and the head's dashboard")
        err_console.print(f"job {job_id} {info.status}")

    @curate_group.command("logs")
    @click.argument("job_id")
    @_address_option
    @click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
    @user_errors
    def logs(job_id, address, follow):
        """The log of a submitted job: the driver's output (stages, Ray Data progress, the done line)."""
        client = connect(address)
        if follow:
            _call("status of", job_id, client.get_job_info, job_id)  # a clear error for an unknown id
            try:
                stream_logs(client, job_id)
            except KeyboardInterrupt:
                sys.exit(130)
        else:
            text = _call("logs of", job_id, client.get_job_logs, job_id)
            _write_stdout(text if text.endswith("\n") or not text else text + "\n")
