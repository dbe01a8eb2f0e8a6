"""Every reader of an output directory made elsewhere, run over hostile data (issue 20, docs/security.md).

The readers are the commands and the loader a user points at someone else's directory: `s2v shards stats`,
`s2v shards verify`, `s2v shards show`, `s2v curate refilter`, the trainer's data loader (`make_loader`, what
`s2v train` iterates) and the ledger's recovery (`Ledger.recover`, what a resumed `s2v curate run` does first).
Each runs in its own process, started from a valid directory that pipeline/testing/hostile.py spoiled, under a
memory limit (RLIMIT_AS: the reader's peak on the valid directory plus MEMORY_MARGIN) and a timeout. The invariant,
for every reader and every case:

- it exits 0, or 2 with a clear error (`s2v` prints a UserFacingError so), or 1 for verify's "problems found";
- no traceback, no MemoryError, no signal (a crash, or the file-size limit), no hang past the timeout;
- no raw control character (ESC, BEL, 8-bit CSI or OSC) on stdout or stderr: text from data reaches a terminal;
- nothing outside the directory changed: `outside/` (files that links in the directory point at) and the
  reader's working directory are the same before and after.

Some cases add what a correct reader must also do: verify does not say OK about a spoiled part of what it checks,
the trainer yields every good sample once per epoch and skips every bad one.

The issue's named cases are parametrized tests, each reported under its own name. Random variants are
hypothesis properties: a few examples by default (derandomized, no example database, so CI is reproducible) and
many with `pytest -m fuzz_long` (S2V_FUZZ_EXAMPLES per property, 100 by default; about 10 s each). Set
S2V_FUZZ_TIMEOUT to change the timeout (60 s).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import count
from pathlib import Path

import psutil
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pipeline.testing import hostile

pytestmark = pytest.mark.slow  # about 3 minutes: CI runs it, the quick loop (-m "not slow") does not

TIMEOUT_S = float(os.environ.get("S2V_FUZZ_TIMEOUT", "60"))
MEMORY_MARGIN = 1536 << 20  # over the reader's own peak on the valid directory: what hostile data may add
OUTPUT_LIMIT = 256 << 20  # RLIMIT_FSIZE: a reader printing or writing without end is stopped (SIGXFSZ)
PARALLEL = 2  # readers of one case at a time: the CI machine has 2 cores
EPOCHS = 2

# ---------------------------------------------------------------------------------------------------------------
# Readers

# The trainer's loader as `s2v train` uses it (trainer/train.py); a UserFacingError or a missing file is what
# `s2v train` prints as a clear error with exit code 2 (trainer/cli.py). Prints the keys it yielded.
TRAIN = textwrap.dedent(f"""
    import json, sys
    from pipeline.core.errors import UserFacingError
    from trainer.data import DataConfig, make_loader
    cfg = DataConfig(shards=sys.argv[1], buckets=[(4, 48, 64)], epochs={EPOCHS}, batch_size=2, shuffle_buffer=0)
    try:
        keys = [key for batch in make_loader(cfg) for key in batch["key"]]
    except (UserFacingError, FileNotFoundError) as exc:
        print(f"Error: {{exc}}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps({{"keys": keys}}))
""")

# What a resumed `s2v curate run` does before anything else: remove the debris no ledger line names.
RECOVER = textwrap.dedent("""
    import sys
    from pipeline.core.errors import UserFacingError
    from pipeline.store.ledger import Ledger
    try:
        Ledger(sys.argv[1]).recover()
    except UserFacingError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        sys.exit(2)
""")

# `s2v shards show OUT KEY --out PNG` for several keys in one process (imports cost seconds per process): the
# command's own click entry, each key's clear error printed as the command line prints it. It leaves by
# os._exit: after two or more contact sheets read manifest.parquet in one process, the interpreter's shutdown
# aborts now and then (SIGABRT, "terminate called without an active exception"; about 1 run in 10 with two
# keys, never seen with one). One key runs the command line itself.
SHOW = textwrap.dedent("""
    import os, sys
    import click
    from pipeline.cli.main import main
    out, png, keys = sys.argv[1], sys.argv[2], sys.argv[3:]
    for key in keys:
        print(f"show {key!r}", file=sys.stderr, flush=True)
        try:
            main(["shards", "show", out, key, "--out", png], standalone_mode=False)
        except click.ClickException as exc:
            print(f"Error: {exc.format_message()}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
""")

# Sets the limits, then becomes the reader: no preexec_fn, which is unsafe while other threads start processes.
LIMITED = "import os, resource, sys; a, f = int(sys.argv[1]), int(sys.argv[2]); " \
          "resource.setrlimit(resource.RLIMIT_AS, (a, a)); resource.setrlimit(resource.RLIMIT_FSIZE, (f, f)); " \
          "os.execv(sys.argv[3], sys.argv[3:])"


def s2v(*args) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli.main", *map(str, args)]


def show(case: hostile.HostileCase, keys: list[str]) -> list[str]:
    if len(keys) == 1:
        return s2v("shards", "show", case.out, keys[0], "--out", case.results / "sheet.png")
    return [sys.executable, "-c", SHOW, str(case.out), str(case.results / "sheet.png"), *keys]


READERS = {
    "stats": lambda c, keys: s2v("shards", "stats", c.out, "--json"),
    "stats_text": lambda c, keys: s2v("shards", "stats", c.out),
    "verify": lambda c, keys: s2v("shards", "verify", c.out, "--json"),
    "verify_text": lambda c, keys: s2v("shards", "verify", c.out),
    "show": lambda c, keys: show(c, keys or [next(iter(c.keys))]),
    "refilter": lambda c, keys: s2v("curate", "refilter", c.out, "--output", c.results / "refiltered",
                                    "--set", "filters.instances.min_area=0.05"),
    "train": lambda c, keys: [sys.executable, "-c", TRAIN, str(c.out)],
    "recover": lambda c, keys: [sys.executable, "-c", RECOVER, str(c.out)],
}
CONTROL = [b"\x1b", b"\x07", "\x9b".encode(), "\x9d".encode()]  # ESC, BEL, and 8-bit CSI and OSC in UTF-8
MAY_EXIT_1 = {"verify", "verify_text"}  # "problems found"; anything else exiting 1 died of an exception
CHANGES_DIRECTORY = {"recover"}  # deletes debris inside the directory: run after the others, alone
SHARD_READERS = ["stats", "verify", "show", "refilter", "train"]
ALL_READERS = [*SHARD_READERS, "recover"]


@dataclass
class Outcome:
    """How one reader ended. `code` is None when it was killed at the timeout; negative for a signal."""

    reader: str
    argv: list[str]
    code: int | None
    out: bytes
    err: bytes
    seconds: float
    peak_vms: int
    limit: int | None

    def describe(self) -> str:
        """The command, how it ended, and the last lines of its stderr (control characters escaped: this text is
        printed by pytest)."""
        shown = " ".join(a if len(a) < 80 else a[:60] + "..." for a in self.argv[:9])
        text = self.err.decode("utf-8", "replace").strip()
        tail = ["".join(c if c.isprintable() else repr(c)[1:-1] for c in line) for line in text.splitlines()[-8:]]
        ended = "killed at the timeout" if self.code is None else f"exit {self.code}"
        return (f"[{self.reader}] {ended} after {self.seconds:.1f}s, peak {self.peak_vms >> 20} MiB virtual "
                f"(limit {(self.limit or 0) >> 20} MiB): {shown}\n      " + "\n      ".join(tail))

    def keys(self) -> list[str]:
        """The sample keys the trainer printed (empty when it printed none)."""
        lines = self.out.decode("utf-8", "replace").strip().splitlines()
        return json.loads(lines[-1])["keys"] if self.code == 0 and lines else []


def child_env(case: hostile.HostileCase) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FORCE_COLOR", "CLICOLOR_FORCE", "PY_COLORS", "TTY_COMPATIBLE", "TTY_INTERACTIVE")}
    # One malloc arena per thread reserves 64 MiB of address space each: capped, RLIMIT_AS measures the reader's
    # data, not how many threads a library started. One OpenMP thread: two readers share the two cores.
    env.update(MALLOC_ARENA_MAX="2", OMP_NUM_THREADS="1", MPLCONFIGDIR=str(case.results / "mpl"), COLUMNS="160",
               PYTHONFAULTHANDLER="1", **case.env)
    return env


def run_reader(case: hostile.HostileCase, reader: str, argv: list[str], limit: int | None,
               timeout: float = TIMEOUT_S) -> Outcome:
    """Run `argv` (reader `reader`) in the case with its limits; its output goes to files (a reader may print
    without end)."""
    wrapped = [sys.executable, "-I", "-c", LIMITED, str(limit or resource.RLIM_INFINITY), str(OUTPUT_LIMIT), *argv]
    out_path, err_path = case.results / f"{reader}.stdout", case.results / f"{reader}.stderr"
    started = time.monotonic()
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        child = subprocess.Popen(wrapped, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=case.cwd,
                                 env=child_env(case), start_new_session=True)
        peak, code = watch(child, started, timeout)
    return Outcome(reader, argv, code, read_head(out_path), read_head(err_path), time.monotonic() - started, peak,
                   limit)


def watch(child: subprocess.Popen, started: float, timeout: float) -> tuple[int, int | None]:
    """Wait for the child, noting its peak virtual size; kill its process group at the timeout. (peak, code)."""
    process, peak = psutil.Process(child.pid), 0
    while child.poll() is None:
        if time.monotonic() - started > timeout:
            with contextlib.suppress(ProcessLookupError):  # it ended just now
                os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            return peak, None
        with contextlib.suppress(psutil.Error):  # gone between poll() and here
            peak = max(peak, process.memory_info().vms)
        time.sleep(0.01)
    return peak, child.returncode


def read_head(path: Path, limit: int = 64 << 20) -> bytes:
    with open(path, "rb") as f:
        return f.read(limit)


def violations(outcome: Outcome) -> list[str]:
    """What breaks the invariant in how one reader ended (module doc)."""
    said = outcome.out + outcome.err
    found = []
    if outcome.code is None:
        found.append(f"hung: no answer in {outcome.seconds:.0f}s")
    elif outcome.code < 0:
        found.append(f"killed by signal {signal.Signals(-outcome.code).name}")
    elif outcome.code not in ({0, 1, 2} if outcome.reader in MAY_EXIT_1 else {0, 2}):
        found.append(f"exit code {outcome.code}")
    for marker in (b"Traceback", b"MemoryError", b"Fatal Python error"):
        if marker in said:
            found.append(f"printed {marker.decode()!r}")
    raw = [c for c in CONTROL if c in said]
    if raw:
        found.append(f"printed raw control characters {raw} (from data: the terminal would act on them)")
    return [f"{'; '.join(found)}\n    {outcome.describe()}"] if found else []


def changes(before: dict, after: dict) -> list[str]:
    """Paths outside the directory that appeared, went or changed."""
    paths = sorted(set(before) | set(after))
    return [f"outside the directory: {p} {'appeared' if p not in before else 'went' if p not in after else 'changed'}"
            for p in paths if before.get(p) != after.get(p)]


def examine(case: hostile.HostileCase, readers: list[str], limits: dict[str, int], keys: list[str] = ()
            ) -> tuple[dict[str, Outcome], list[str]]:
    """Run `readers` on the case (PARALLEL at a time, then those that change the directory); their outcomes and
    every violation of the invariant, the snapshot of what is outside the directory included."""
    before = case.snapshot()

    def run(reader: str) -> Outcome:
        return run_reader(case, reader, READERS[reader](case, list(keys)), limits[reader])

    reading = [r for r in readers if r not in CHANGES_DIRECTORY]
    with ThreadPoolExecutor(PARALLEL) as pool:
        outcomes = dict(zip(reading, pool.map(run, reading)))
    for reader in readers:
        if reader in CHANGES_DIRECTORY:
            outcomes[reader] = run(reader)
    problems = [v for o in outcomes.values() for v in violations(o)] + changes(before, case.snapshot())
    return outcomes, problems


def report(problems: list[str]) -> str:
    return f"{len(problems)} problem(s):\n  " + "\n  ".join(problems)


# ---------------------------------------------------------------------------------------------------------------
# The base directory, the limits, and a fresh case per example

_cases = count()


@pytest.fixture(scope="session")
def base(tmp_path_factory) -> Path:
    """The valid directory every case starts from (hostile.build_valid_run)."""
    return hostile.build_valid_run(tmp_path_factory.mktemp("hostile-base") / "out")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("hostile-cases")


@pytest.fixture(scope="session")
def calibration(base, workdir) -> tuple[dict[str, int], dict[str, Outcome], list[str], hostile.HostileCase]:
    """Every reader once on an untouched copy, without a memory limit: the limits (peak + MEMORY_MARGIN), and
    what the readers did and changed, for test_valid_directory_passes_every_reader."""
    case = hostile.new_case(base, workdir / "calibration")
    before = case.snapshot()
    with ThreadPoolExecutor(PARALLEL) as pool:
        outcomes = dict(zip(ALL_READERS, pool.map(lambda r: run_reader(case, r, READERS[r](case, []), None),
                                                  ALL_READERS)))
    limits = {r: outcomes[r].peak_vms + MEMORY_MARGIN for r in ALL_READERS}
    limits.update(stats_text=limits["stats"], verify_text=limits["verify"])
    return limits, outcomes, changes(before, case.snapshot()), case


@pytest.fixture(scope="session")
def limits(calibration) -> dict[str, int]:
    return calibration[0]


class Case:
    """A fresh copy of the base for one example, deleted afterwards (a long run makes thousands)."""

    def __init__(self, base: Path, workdir: Path):
        self.case = hostile.new_case(base, workdir / f"case-{next(_cases)}")

    def __enter__(self) -> hostile.HostileCase:
        return self.case

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.case.root, ignore_errors=True)


def yielded_twice(train: Outcome, keys: list[str]) -> list[str]:
    """Problems unless the trainer yielded each of `keys` once per epoch."""
    counts = Counter(train.keys())
    missing = [k for k in keys if counts[k] != EPOCHS]
    return [f"the trainer yielded {len(keys) - len(missing)} of {len(keys)} good samples {EPOCHS} times; "
            f"not: {', '.join(f'{k} ({counts[k]}x)' for k in missing[:6])}\n    {train.describe()}"] if missing else []


def untouched_keys(case: hostile.HostileCase, spoiled_shards) -> list[str]:
    return [k for k, rel in case.keys.items() if rel not in set(spoiled_shards)]


# ---------------------------------------------------------------------------------------------------------------
# Hypothesis: a few examples by default, many with -m fuzz_long

SHORT = settings(deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
                 suppress_health_check=list(HealthCheck), print_blob=False)
# New examples every long run (not derandomized); S2V_FUZZ_EXAMPLES sets how many per property.
LONG = settings(SHORT, derandomize=False, max_examples=int(os.environ.get("S2V_FUZZ_EXAMPLES", "100")))


def short_and_long(body, examples: int, **strategies):
    """Two tests of one property: `examples` generated examples under SHORT settings, and LONG ones, marked
    fuzz_long."""
    short = settings(SHORT, max_examples=examples)(given(**strategies)(body))
    return short, pytest.mark.fuzz_long(settings(LONG)(given(**strategies)(body)))


def long_only(*values) -> list:
    """Parameters for the long run only (cases that cost time and add little to the default run's)."""
    return [pytest.param(v, marks=pytest.mark.fuzz_long) for v in values]


@pytest.fixture(autouse=True)
def long_runs_when_selected(request):
    """A test marked fuzz_long runs only when `-m fuzz_long` selects it (a plain `pytest`, as CI runs it, would
    otherwise run them all)."""
    if request.node.get_closest_marker("fuzz_long") and "fuzz_long" not in (request.config.getoption("markexpr")
                                                                           or ""):
        pytest.skip("a long run: pytest -m fuzz_long")


# ---------------------------------------------------------------------------------------------------------------
# The valid directory


def test_valid_directory_passes_every_reader(calibration):
    """The base is a directory every reader accepts whole: otherwise a case's failures say nothing."""
    _, outcomes, changed, case = calibration
    problems = list(changed)
    problems += [v for o in outcomes.values() for v in violations(o)]
    problems += [f"exit {o.code} on the valid directory\n    {o.describe()}" for o in outcomes.values() if o.code]
    problems += yielded_twice(outcomes["train"], list(case.keys))
    assert not problems, report(problems)
    assert json.loads(outcomes["verify"].out)["ok"]


def test_the_checks_see_a_blowup_a_hang_and_a_write_outside(base, workdir):
    """The invariant is live: a reader allocating past its memory limit, one that never answers, and one that
    writes next to the directory are each reported."""
    with Case(base, workdir) as case:
        blowup = run_reader(case, "blowup", [sys.executable, "-c", "bytearray(2 << 30)"], 1 << 30)
        hang = run_reader(case, "hang", [sys.executable, "-c", "import time; time.sleep(60)"], None, timeout=2)
        before = case.snapshot()
        run_reader(case, "writer", [sys.executable, "-c", "open('../outside/victim.txt', 'a').write('x')"], None)
        assert "MemoryError" in violations(blowup)[0] and blowup.code == 1
        assert "hung" in violations(hang)[0] and hang.code is None
        assert changes(before, case.snapshot()) == ["outside the directory: outside/victim.txt changed"]


# ---------------------------------------------------------------------------------------------------------------
# Tar members and whole shards

MEMBER_NAMES = sorted(hostile.MEMBER_CASES) + sorted(hostile.SHARD_CASES)
SPOILABLE = hostile.SOURCES - 1  # the last shard stays good: the trainer must still yield it
NAMED_GROUPS = [MEMBER_NAMES[i:i + SPOILABLE] for i in range(0, len(MEMBER_NAMES), SPOILABLE)]


def spoil(case: hostile.HostileCase, placements) -> list[str]:
    """Shard i gets placement i: (a case name or raw member bytes, member position). The shards spoiled."""
    spoiled = []
    for i, (what, position) in enumerate(placements[:SPOILABLE]):
        rel = case.shards[i]
        if isinstance(what, bytes):
            hostile.insert_raw(case, rel, what, position)
        else:
            hostile.spoil_shard(case, rel, what, position)
        spoiled.append(rel)
    return spoiled


def check_members(base, workdir, limits, placements) -> None:
    with Case(base, workdir) as case:
        spoiled = spoil(case, placements)
        # Showing a key no shard holds walks the headers of every shard; two more read spoiled shards' members.
        keys = [hostile.HOSTILE_KEY] + [case.keys_in(rel)[0] for rel in spoiled[:2]]
        outcomes, problems = examine(case, SHARD_READERS, limits, keys)
        problems += unreported(outcomes["verify"], {rel: what for rel, (what, _) in zip(spoiled, placements)
                                                    if isinstance(what, str) and must_report(what)})
        problems += yielded_twice(outcomes["train"], untouched_keys(case, spoiled))
        assert not problems, report(problems)


def must_report(name: str) -> bool:
    return name in hostile.SHARD_CASES or hostile.MEMBER_CASES[name].verify_reports


def unreported(verify: Outcome, cases: dict[str, str]) -> list[str]:
    """Problems unless verify --json names each shard of `cases` (shard -> case name) in a problem."""
    if verify.code != 1:
        return [f"verify did not report {', '.join(cases.values())}\n    {verify.describe()}"] if cases else []
    named = {p.get("shard") for p in json.loads(verify.out)["problems"]}
    missed = [f"{case} ({rel})" for rel, case in cases.items() if rel not in named]
    return [f"verify names no problem in the shards of {', '.join(missed)}\n    {verify.describe()}"] if missed else []


@pytest.mark.parametrize("names", NAMED_GROUPS, ids=["+".join(g) for g in NAMED_GROUPS])
def test_hostile_members(base, workdir, limits, names):
    """Sparse members expanding to 2 and 40 GiB, sizes past the file's end, pax and long-name headers of megabytes
    or declaring a gigabyte, links, devices, FIFOs, folders, names that are no KEY.PART or leave the shard, and
    whole shards that are gzip bombs, compressed, garbage, empty or cut: one per shard, the last shard good."""
    check_members(base, workdir, limits, [(name, 3 + 7 * i) for i, name in enumerate(names)])


placements = st.lists(st.tuples(st.sampled_from(MEMBER_NAMES) | hostile.random_member(), st.integers(0, 63)),
                      min_size=1, max_size=SPOILABLE)


def members_property(base, workdir, limits, placements):
    """Random mixes of hostile members, and members with random header fields, at random positions."""
    check_members(base, workdir, limits, placements)


test_members_random, test_members_random_long = short_and_long(members_property, 1, placements=placements)


# ---------------------------------------------------------------------------------------------------------------
# Links, FIFOs and devices in the directory

DIR_GROUPS = [
    ["shard_symlink_outside", "shard_fifo", "shard_folder", "shard_char_device", "unlisted_fifo_shard"],
    ["shards_dir_link", "rejects_dir_link", "staging_dir_link"],
    ["ledger_dev_zero", "index_dev_zero", "manifest_fifo", "config_dev_zero"],
    ["ledger_fifo", "index_fifo", "manifest_urandom", "config_link_outside", "summary_dev_zero"],
]


# What verify does not check (shards, index.json, the manifest and the ledger are what it checks), so may pass
# over: config.yaml, summary.json, and the scratch folder .staging/ (recovery's, covered by the snapshot).
VERIFY_BLIND = {"config_link_outside", "config_dev_zero", "summary_dev_zero", "staging_dir_link"}


def check_directory(base, workdir, limits, names) -> None:
    with Case(base, workdir) as case:
        hostile.apply_dir_cases(case, names)
        outcomes, problems = examine(case, ALL_READERS, limits)
        seen = sorted(set(names) - VERIFY_BLIND)
        if seen and outcomes["verify"].code == 0:
            problems.append(f"verify says OK over {', '.join(seen)}\n    {outcomes['verify'].describe()}")
        assert not problems, report(problems)


@pytest.mark.parametrize("names", DIR_GROUPS, ids=["+".join(g) for g in DIR_GROUPS])
def test_hostile_directory(base, workdir, limits, names):
    """A shard that is a link out of the directory, a FIFO, a folder or a device; shards/, rejects/ and .staging/
    linked to folders outside holding files no ledger line names (recovery must not delete them); the ledger,
    index.json, the manifest, config.yaml and summary.json as /dev/zero, /dev/urandom, FIFOs or links out."""
    check_directory(base, workdir, limits, names)


def directory_property(base, workdir, limits, names):
    """Random sets of the directory's special files and links (two for one file: the later name wins)."""
    check_directory(base, workdir, limits, names)


test_directory_random, test_directory_random_long = short_and_long(
    directory_property, 1, names=st.sets(st.sampled_from(sorted(hostile.DIR_CASES)), min_size=1, max_size=4))


# ---------------------------------------------------------------------------------------------------------------
# KEY.json


def test_trainer_skips_every_hostile_key_json(base, workdir, limits):
    """One sample per hostile KEY.json (negative, huge and fractional ids and sizes, NaN, 100k-deep nesting, huge
    strings, wrong types, names of files outside the sample): the trainer yields every good sample once per epoch
    and none of those that are not this project's KEY.json, naming each one it skips; the other readers keep the
    invariant."""
    with Case(base, workdir) as case:
        metas = hostile.sample_metas(case.out)
        chosen = hostile.place_meta_cases(metas, sorted(hostile.META_CASES))
        hostile.write_metas(case, {key: hostile.META_CASES[name].build(metas[key][1]) for name, key in chosen.items()})
        outcomes, problems = examine(case, SHARD_READERS, limits, list(chosen.values()))
        train = outcomes["train"]
        good = [k for k in case.keys if k not in chosen.values()]
        problems += yielded_twice(train, good)
        skipped = {name: key for name, key in chosen.items() if hostile.META_CASES[name].skip}
        wrongly = [f"{name} ({key})" for name, key in skipped.items() if key in set(train.keys())]
        unnamed = [name for name, key in skipped.items() if train.code == 0 and key.encode() not in train.err]
        if wrongly:
            problems.append(f"the trainer yielded {len(wrongly)} samples it must skip: {', '.join(wrongly)}")
        if unnamed:
            problems.append(f"the trainer skipped without naming the sample: {', '.join(unnamed)}")
        assert not problems, report(problems)


def key_json_property(base, workdir, limits, data):
    """1-3 samples whose KEY.json has random JSON values at random paths: each bad sample costs only itself."""
    with Case(base, workdir) as case:
        metas = hostile.sample_metas(case.out)
        keys = data.draw(st.lists(st.sampled_from(sorted(metas)), min_size=1, max_size=3, unique=True), "keys")
        hostile.write_metas(case, {k: data.draw(hostile.substituted_meta(metas[k][1]), f"KEY.json of {k}")
                                   for k in keys})
        outcomes, problems = examine(case, SHARD_READERS, limits, keys)
        problems += yielded_twice(outcomes["train"], [k for k in case.keys if k not in keys])
        assert not problems, report(problems)


test_key_json_random, test_key_json_random_long = short_and_long(key_json_property, 2, data=st.data())


# ---------------------------------------------------------------------------------------------------------------
# Decoded-size bombs


def test_decoded_size_bombs(base, workdir, limits):
    """A 13000x13000 PNG (20 KB) as a reference, a PNG declaring 60000x60000 RGBA as a plate, the same 13000x13000
    as a mask, a .npy declaring 40 GB and one of dtype object as face embeddings, and a clip over the pixel limit
    (S2V_LIMIT_MAX_PIXELS lowered below it; the clip's KEY.json still claims 64x48). The trainer skips the samples
    whose reference, plate or clip is a bomb and yields the others."""
    with Case(base, workdir) as case:
        metas = hostile.sample_metas(case.out)
        with_refs = [k for k, (_, m) in metas.items() if any(e.get("references") for e in m["entities"])
                     and m.get("background")]
        ref_bomb, plate_bomb, mask_bomb, npy_bomb, npy_pickle, clip_bomb = with_refs[:6]
        hostile.replace_member(case, ref_bomb, "ref0.png", hostile.png_bomb())
        hostile.replace_member(case, plate_bomb, "bg.png", hostile.png_header_bomb())
        hostile.replace_member(case, mask_bomb, "mask0.png", hostile.png_bomb())
        hostile.replace_member(case, npy_bomb, "faces.npy", hostile.npy_header_bomb())
        hostile.replace_member(case, npy_pickle, "faces.npy", hostile.npy_object())
        hostile.replace_member(case, clip_bomb, "mp4", hostile.tiny_clip(256, 192, 3))
        case.env["S2V_LIMIT_MAX_PIXELS"] = "20000"  # over every reference and plate of the base, under 256x192
        bombs = [ref_bomb, plate_bomb, mask_bomb, npy_bomb, npy_pickle, clip_bomb]
        outcomes, problems = examine(case, SHARD_READERS, limits, bombs)
        must_skip = {ref_bomb, plate_bomb, clip_bomb}
        problems += yielded_twice(outcomes["train"], [k for k in case.keys if k not in must_skip])
        wrongly = must_skip & set(outcomes["train"].keys())
        if wrongly:
            problems.append(f"the trainer yielded samples whose image or clip is over the pixel limit: {wrongly}")
        assert not problems, report(problems)


# ---------------------------------------------------------------------------------------------------------------
# config.yaml, manifest.parquet, index.json, ledger.jsonl


YAML_LONG = ["deep_flow_100k", "not_utf8"]


@pytest.mark.parametrize("name", [n for n in sorted(hostile.YAML_CASES) if n not in YAML_LONG]
                         + long_only(*YAML_LONG))
def test_hostile_config_yaml(base, workdir, limits, name):
    """A billion laughs (about 430 bytes; alone, as an extra key and in place of references.ratio), a recursive
    alias, 100k-deep nesting, a python/object tag that would touch a file, bytes that are not UTF-8."""
    with Case(base, workdir) as case:
        hostile.write_config_case(case, name)
        _, problems = examine(case, ["stats", "refilter"], limits)
        assert not problems, report(problems)


@pytest.fixture(scope="session")
def huge_manifest(base, workdir) -> bytes:
    """manifest.parquet of 12 million rows (about 1 MB), naming a real key and shard."""
    path = workdir / "manifest-12m.parquet"
    key, (shard, _) = next(iter(hostile.sample_metas(base).items()))
    hostile.write_huge_manifest(path, key=key, shard=shard)
    return path.read_bytes()


@pytest.mark.parametrize("name", ["rows_12m", "garbage", "wrong_types", *long_only("truncated")])
def test_hostile_manifest(base, workdir, limits, huge_manifest, name):
    """manifest.parquet of 12 million rows in a megabyte, garbage between parquet magics, wrong column types, cut
    short; verify must not say OK."""
    with Case(base, workdir) as case:
        (case.out / "manifest.parquet").write_bytes(hostile.MANIFEST_CASES[name](case, huge_manifest))
        readers = ["stats", "verify", "show", "refilter"] if name == "rows_12m" else ["verify", "show"]
        outcomes, problems = examine(case, readers, limits, [next(iter(case.keys))])
        if outcomes["verify"].code == 0:
            problems.append(f"verify says OK over manifest {name}\n    {outcomes['verify'].describe()}")
        assert not problems, report(problems)


INDEX_GROUPS = [["url_not_string", "url_escape", "nsamples_strings", "sizes_wrong", "sha_wrong"], ["url_outside"],
                ["duplicate_urls", "total_string"]]
# One-line refusals of the whole file, and entries that are no objects (test_index_random draws those too).
INDEX_LONG = [["entries_not_objects"], ["shardlist_object"], ["deep_100k"], ["nan"], ["top_level_list"],
              ["not_utf8"], ["empty_file"]]


def check_index(base, workdir, limits, change) -> None:
    with Case(base, workdir) as case:
        change(case)
        outcomes, problems = examine(case, ["verify", "show", "train"], limits)
        if outcomes["verify"].code == 0:
            problems.append(f"verify says OK over a spoiled index.json\n    {outcomes['verify'].describe()}")
        repeated = {k: n for k, n in Counter(outcomes["train"].keys()).items() if n > EPOCHS}
        if repeated:  # a shard listed twice is one shard: read twice, it would weigh its samples double
            problems.append(f"the trainer yielded {len(repeated)} samples more than once per epoch (a shard listed "
                            f"several times read each time), e.g. {next(iter(repeated.items()))}")
        assert not problems, report(problems)


@pytest.mark.parametrize("names", INDEX_GROUPS + long_only(*INDEX_LONG),
                         ids=["+".join(g) for g in INDEX_GROUPS + INDEX_LONG])
def test_hostile_index(base, workdir, limits, names):
    """index.json with urls that are no text, that leave shards/ (.., absolute, file://, /dev/zero), listed twenty
    times; counts and sizes as text, negative or 1e30; entries that are not objects. The trainer yields no sample
    more than once per epoch."""
    check_index(base, workdir, limits, lambda case: hostile.write_index_case(case, names))


def index_property(base, workdir, limits, data):
    """A shardlist of random entries: real ones, hostile urls, random JSON in every field."""
    def change(case):
        entries = data.draw(hostile.index_entries(case), "shardlist")
        index = json.loads((case.out / "index.json").read_text())
        (case.out / "index.json").write_text(json.dumps(dict(index, shardlist=entries), allow_nan=True))
    check_index(base, workdir, limits, change)


test_index_random, test_index_random_long = short_and_long(index_property, 1, data=st.data())


@pytest.mark.parametrize("lines", ["orphans_outside", "junk"])
def test_hostile_ledger(base, workdir, limits, lines):
    """Ledger lines naming shards outside shards/ that no source commits (recovery deletes such orphans: never
    those), and lines that are no entry: over the line limit, 100k deep, wrong types, NaN, not UTF-8."""
    with Case(base, workdir) as case:
        build = hostile.orphan_lines if lines == "orphans_outside" else hostile.junk_lines
        hostile.append_ledger(case, build(case))
        _, problems = examine(case, ["stats", "verify", "show", "refilter", "recover"], limits)
        gone = [name for name in ("ledger.jsonl", "index.json", *case.shards) if not (case.out / name).is_file()]
        if gone:
            problems.append(f"files of the directory deleted through ledger names: {', '.join(gone)}")
        assert not problems, report(problems)


# ---------------------------------------------------------------------------------------------------------------
# Terminal injection

def test_terminal_injection(base, workdir, limits):
    """Escapes (OSC 52 clipboard, title, screen clear, 8-bit CSI) and rich markup in KEY.json text, a member name,
    ledger paths and reasons, and a KEY argument: no reader prints a raw control character (the invariant), and
    stats and verify, whose text output shows words, paths and reasons, do not crash on the markup."""
    with Case(base, workdir) as case:
        keys = hostile.inject_escapes(case)[:2] + [hostile.ESCAPES[1]]
        readers = ["stats", "stats_text", "verify", "verify_text", "show", "train"]
        _, problems = examine(case, readers, limits, keys)
        assert not problems, report(problems)
