"""Crash safety of the shard writer + ledger: die at every commit point, recover, finish, compare."""

import json
import os
import tarfile

import pytest
import webdataset as wds

from pipeline.core.config import OutputConfig
from pipeline.core.files import file_sha256
from pipeline.core.storage import UnsafeFile
from pipeline.core.untrusted import read_limits
from pipeline.store.ledger import SPOOL_DIR, STAGING_DIR, Ledger
from pipeline.store.outputs import write_outputs
from pipeline.store.shards import ShardError, ShardSink, iter_members, iter_samples
from pipeline.testing import hostile

# Sources with 0..5 samples; with 3 samples per shard, "e" alone overfills a shard.
SOURCES = {"a": 2, "b": 0, "c": 3, "d": 1, "e": 5, "f": 2, "g": 1}


class Died(Exception):
    pass


class DyingLedger(Ledger):
    """Stops the "process" right before its n-th append, as a kill would."""

    def __init__(self, out_dir, appends_left):
        super().__init__(out_dir)
        self.appends_left = appends_left

    def append(self, entry):
        if self.appends_left == 0:
            raise Died()
        self.appends_left -= 1
        super().append(entry)


def source(name, count):
    keys = [f"{name}{i}" for i in range(count)]
    rows = [{"key": k, "shard": None, "duration_s": 1.0} for k in keys]
    entry = {"type": "source", "path": f"/v/{name}.mp4", "source_id": name, "size": 1, "mtime_ns": 1,
             "status": "curated", "samples": rows, "clips": [{"key": k, "status": "kept"} for k in keys],
             "errors": [], "duration_s": 1.0}
    samples = [{"__key__": k, "mp4": f"video-{k}".encode() * 50, "json": json.dumps({"key": k}).encode()} for k in keys]
    return entry, samples


def run(out, ledger):
    state = ledger.recover()
    sink = ShardSink(out, OutputConfig(shard_max_samples=3), ledger, state)
    for name, count in SOURCES.items():
        if name not in state.sources:
            sink.add_source(*source(name, count))
    sink.close()


def shard_keys(out):
    keys = []
    for shard in sorted((out / "shards").glob("*.tar")):
        keys += [s["__key__"] for s in wds.WebDataset(str(shard), shardshuffle=False)]
    return keys


EXPECTED = sorted(f"{n}{i}" for n, c in SOURCES.items() for i in range(c))


def count_appends(tmp_path):
    out = tmp_path / "count"
    run(out, Ledger(out))
    return len((out / "ledger.jsonl").read_text().splitlines())


def test_uninterrupted_run_writes_every_sample_once(tmp_path):
    out = tmp_path / "out"
    run(out, Ledger(out))
    assert sorted(shard_keys(out)) == EXPECTED
    state = Ledger(out).read()
    assert set(state.sources) == set(SOURCES)
    # A source never straddles a shard boundary unless it alone overfills one.
    for entry in state.sources.values():
        shards = {s["shard"] for s in entry["samples"]}
        assert len(shards) <= 1 or len(entry["samples"]) > 3
    for name, shard in state.shards.items():
        assert shard["sha256"] == file_sha256(out / name)


# The abandoned writer of a "dead" run is garbage-collected with its tar still open; that noise is expected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_killed_at_any_commit_point_then_rerun_gives_the_same_samples(tmp_path):
    total = count_appends(tmp_path)
    assert total >= 5
    for die_at in range(total):
        out = tmp_path / f"out{die_at}"
        with pytest.raises(Died):
            run(out, DyingLedger(out, die_at))
        run(out, Ledger(out))
        keys = shard_keys(out)
        assert sorted(keys) == EXPECTED, f"died before append {die_at}: duplicates or losses"
        assert not list((out / "shards").glob("*.tmp"))
        summary = write_outputs(out, Ledger(out).read())
        index = json.loads((out / "index.json").read_text())
        assert index["total_samples"] == len(EXPECTED) == summary["samples"]
        assert {e["url"] for e in index["shardlist"]} == {f"shards/{p.name}" for p in (out / "shards").glob("*.tar")}


def test_torn_last_ledger_line_is_ignored_and_repaired(tmp_path):
    out = tmp_path / "out"
    run(out, Ledger(out))
    ledger_path = out / "ledger.jsonl"
    ledger_path.write_text(ledger_path.read_text() + '{"type": "source", "sou')
    state = Ledger(out).recover()
    assert set(state.sources) == set(SOURCES)
    assert ledger_path.read_text().endswith("\n")
    Ledger(out).append({"type": "run", "wall_s": 1})
    assert len(Ledger(out).read().runs) == 1


def test_recovery_removes_staged_samples_of_sources_a_crash_left_in_flight(tmp_path):
    out = tmp_path / "out"
    run(out, Ledger(out))
    for scratch in (STAGING_DIR + "/run1", SPOOL_DIR):  # this release's staging, and an earlier release's spool
        (out / scratch).mkdir(parents=True)
        (out / scratch / "00000001.tar").write_bytes(b"half a source")
    state = Ledger(out).recover()
    assert not (out / STAGING_DIR).exists() and not (out / SPOOL_DIR).exists()
    assert set(state.sources) == set(SOURCES)  # committed work is untouched


# ---------------------------------------------------------------------------------------------------------------
# The one reader on shards made elsewhere (issue 20): refused with a named reason before anything is allocated


def _good(key: str = "k1") -> bytes:
    return hostile.member(f"{key}.json", b'{"key": "%s"}' % key.encode()) + hostile.member(f"{key}.mp4", b"\0" * 700)


def _shard(tmp_path, *members: bytes, name: str = "train-000000.tar") -> str:
    path = tmp_path / name
    path.write_bytes(b"".join(members) + bytes(2 * hostile.BLOCK))
    return str(path)


def _read_all(shard: str) -> list[tuple[str, int]]:
    return [(f"{key}.{part}", len(read())) for key, part, _member, read in iter_members(shard)]


@pytest.mark.parametrize("bomb", [
    pytest.param(lambda: hostile.sparse_gnu("k2.mp4", 40 << 30), id="gnu-sparse-40GiB"),
    pytest.param(lambda: hostile.sparse_pax("k2.mp4", 2 << 30), id="pax-sparse-2GiB"),
])
def test_sparse_members_are_refused_not_expanded(tmp_path, bomb):
    shard = _shard(tmp_path, _good(), bomb(), _good("k3"))
    samples = []
    with pytest.raises(ShardError, match="is a sparse file") as refused:
        for key, part, _member, read in iter_members(shard):
            samples.append((key, part, len(read())))  # before: 2 GiB of zeros in memory, or MemoryError at 40
    assert refused.value.reason == "irregular_member"
    assert samples == [("k1", "json", 13), ("k1", "mp4", 700)]  # what came before is read; nothing after


@pytest.mark.parametrize("kind, what", [(tarfile.SYMTYPE, "a symbolic link"), (tarfile.LNKTYPE, "a hard link"),
                                        (tarfile.FIFOTYPE, "a FIFO"), (tarfile.CHRTYPE, "a device"),
                                        (tarfile.DIRTYPE, "a folder")])
def test_members_that_are_not_regular_files_are_refused(tmp_path, kind, what):
    odd = hostile.header("k2.mp4", 0, kind=kind, linkname="/etc/passwd" if kind in (b"1", b"2") else "")
    with pytest.raises(ShardError, match=what) as refused:
        _read_all(_shard(tmp_path, _good(), odd))
    assert refused.value.reason == "irregular_member"


def test_a_compressed_shard_is_never_inflated(tmp_path):
    path = tmp_path / "train-000000.tar"
    path.write_bytes(hostile.gzip_bomb(1 << 30))  # a few MB that inflate to a 1 GiB member
    with pytest.raises(ShardError, match="gzip-compressed") as refused:
        _read_all(str(path))
    assert refused.value.reason == "compressed_shard"


def test_headers_that_declare_more_than_the_file_holds_allocate_nothing(tmp_path):
    past_end = hostile.header("k2.mp4", 3 << 30)  # a member of 3 GiB in a file of a few KB
    with pytest.raises(ShardError, match="needs 3221228544 bytes, the file has 4096") as refused:
        _read_all(_shard(tmp_path, _good(), past_end))
    assert refused.value.reason == "truncated_tar"
    long_name = hostile.gnu_longname(b"", declared=4 << 30)  # tarfile reads a long name whole
    with pytest.raises(ShardError):
        _read_all(_shard(tmp_path, _good(), long_name, name="train-000001.tar"))


def test_a_member_over_its_part_cap_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("S2V_LIMIT_MAX_JSON_MB", "0.001")  # about 1 KB for a KEY.json
    read_limits.cache_clear()
    try:
        shard = _shard(tmp_path, _good(), hostile.member("k2.json", b" " * 2000))
        with pytest.raises(ShardError, match=r"'k2.json' declares 2000 bytes, over the 1048 byte cap") as refused:
            _read_all(shard)
    finally:
        read_limits.cache_clear()
    assert refused.value.reason == "member_too_large"


def test_a_shard_that_is_a_link_or_a_fifo_is_not_opened(tmp_path):
    real = _shard(tmp_path, _good(), name="elsewhere.tar")
    (tmp_path / "train-000000.tar").symlink_to(real)
    with pytest.raises(UnsafeFile, match="symbolic link"):
        _read_all(str(tmp_path / "train-000000.tar"))
    os.mkfifo(tmp_path / "train-000001.tar")
    with pytest.raises(UnsafeFile, match="a FIFO"):  # before: waited forever for a writer
        _read_all(str(tmp_path / "train-000001.tar"))


def test_iter_samples_groups_members_as_webdataset_does(tmp_path):
    shard = _shard(tmp_path, _good("k1"), _good("k2"))
    samples = list(iter_samples(shard, select=lambda part: part == "json"))
    assert [(s["__key__"], sorted(s)) for s in samples] == [("k1", ["__key__", "__url__", "json"]),
                                                            ("k2", ["__key__", "__url__", "json"])]
    upstream = [s["__key__"] for s in wds.WebDataset(shard, shardshuffle=False)]
    assert upstream == ["k1", "k2"]
