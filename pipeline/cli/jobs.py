"""`s2v curate submit / status / stop / logs`: curation as Ray Jobs on a cluster (the client side is
pipeline/run/jobs.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from pipeline.cli.console import err_console
from pipeline.core.errors import user_errors
from pipeline.run.jobs import (
    ADDRESS_ENV,
    DEFAULT_EXCLUDES,
    DEFAULT_MAX_FILE_MB,
    PROJECT_ROOT,
    TERMINAL,
    JobsError,
    build_runtime_env,
    call,
    check_cluster_paths,
    config_for_job,
    connect,
    curate_entrypoint,
    default_submission_id,
    describe,
    first_line,
    job_dict,
    stream_logs,
    wait_for,
    write_stdout,
)


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
    @click.option("--input", "inputs", multiple=True, help="Video file, directory or glob: s3:// or gs:// URI, or "
                  "an absolute path on the cluster's shared storage; repeatable.")
    @click.option("--metadata", help="JSONL with per-video captions: a URI or an absolute shared path.")
    @click.option("--output", "-o", required=True, help="Output: an s3:// or gs:// prefix, or an absolute directory "
                  "on the cluster's shared storage; shards are written on the worker nodes, commits by the driver. "
                  "Resubmit with the same --output to resume.")
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
        from pipeline.core.config import load_config

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
            raise JobsError(f"the cluster did not accept the job: {first_line(exc)}") from None
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
            err_console.print(f"[yellow]log stream ended early[/]: {first_line(exc)}")
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
        info = call("status of", job_id, client.get_job_info, job_id)
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
        if not call("stop", job_id, client.stop_job, job_id):
            info = call("status of", job_id, client.get_job_info, job_id)
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
            call("status of", job_id, client.get_job_info, job_id)  # a clear error for an unknown id
            try:
                stream_logs(client, job_id)
            except KeyboardInterrupt:
                sys.exit(130)
        else:
            text = call("logs of", job_id, client.get_job_logs, job_id)
            write_stdout(text if text.endswith("\n") or not text else text + "\n")
