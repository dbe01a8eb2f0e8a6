"""`verify`: clean on a real finished run and on a run with cross-pair shards; each kind of damage is caught, and
named precisely (a damaged copy shows that problem and no unrelated one)."""

import hashlib
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from pipeline.inspection.verify import verify, verify_output
from pipeline.store.ledger import Ledger
from pipeline.store.outputs import write_outputs
from pipeline.testing import hostile, synthetic_runs

SHARD = "shards/train-000000.tar"


def whats(problems) -> list[str]:
    return sorted(p.what for p in problems)


@pytest.fixture
def run_copy(curated_out, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(curated_out, out)
    return out


@pytest.fixture(scope="module")
def cross_run(tmp_path_factory) -> Path:
    """A committed synthetic run of 4 sources (20 own samples) with its cross-pair shards and derived files, built
    with pipeline.testing.synthetic_runs (placeholder mp4 members: verify reads them but does not decode them)."""
    out = tmp_path_factory.mktemp("cross") / "out"
    synthetic_runs.commit_sources(out, range(4))
    synthetic_runs.run_pass(out)
    write_outputs(out, Ledger(out).read())
    return out


def members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_a_finished_run_verifies_clean(curated_out):
    result = verify_output(curated_out)
    index = json.loads((curated_out / "index.json").read_text())
    assert result.problems == [] and result.ok
    assert result.shards == len(index["shardlist"]) >= 1 and result.samples == index["total_samples"] >= 2
    assert result.to_dict()["ok"] and "OK" in result.summary_line()


def test_a_run_with_cross_pair_shards_verifies_clean(cross_run):
    result = verify_output(cross_run)
    assert result.problems == []
    assert result.samples == 20 + len(Ledger(cross_run).read().cross["samples"]) > 20
    assert any(e["url"].startswith("shards/cross-") for e in json.loads((cross_run / "index.json").read_text())
               ["shardlist"])


@pytest.mark.parametrize("where", ["inside_a_member", "inside_a_member_block_aligned", "at_a_member_boundary"])
def test_a_truncated_tar_is_caught(run_copy, where):
    path = run_copy / SHARD
    mp4 = next(m for m in members(path) if m.name.endswith(".mp4"))
    header = members(path)[4]
    cut = {"inside_a_member": mp4.offset_data + mp4.size // 2,
           "inside_a_member_block_aligned": mp4.offset_data + 512 * (mp4.size // 1024),
           "at_a_member_boundary": header.offset}[where]
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    problems = verify(run_copy)
    assert {"size_mismatch", "truncated_tar"} <= set(whats(problems)), problems
    assert all(p.shard == SHARD for p in problems if p.what != "missing_part")
    # Whatever else shows is the consequence: a sample left incomplete by the cut, a read that stopped.
    assert set(whats(problems)) <= {"size_mismatch", "truncated_tar", "unreadable", "missing_part"}


def test_upstream_webdataset_alone_misses_a_cut_at_a_member_boundary(run_copy):
    """Why verify walks the tar structure itself: the library reads the cut shard as a shorter, valid archive."""
    path = run_copy / SHARD
    path.write_bytes(path.read_bytes()[: members(path)[-1].offset])
    keys = [s["__key__"] for s in wds.WebDataset(str(path), shardshuffle=False)]
    assert keys  # no error
    assert "truncated_tar" in whats(verify(run_copy))


def test_a_missing_reference_file_is_the_one_problem(run_copy):
    path = run_copy / SHARD
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    victim = next(s for s in samples if "ref0.png" in s)
    with wds.TarWriter(str(path), encoder=False, mtime=0.0) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items()
                          if not (sample is victim and k == "ref0.png") and k not in ("__url__", "__local_path__")})
    hostile.reseal(run_copy, SHARD)
    problems = verify(run_copy)
    assert len(problems) == 1, problems
    assert (problems[0].what, problems[0].shard, problems[0].key) == ("missing_part", SHARD, victim["__key__"])
    assert "ref0.png" in problems[0].detail


def test_a_wrong_checksum_is_caught(run_copy):
    path = run_copy / SHARD
    mp4 = next(m for m in members(path) if m.name.endswith(".mp4"))
    data = bytearray(path.read_bytes())
    data[mp4.offset_data + mp4.size // 2] ^= 0xFF  # bit rot: same size, the tar still reads
    path.write_bytes(bytes(data))
    problems = verify(run_copy)
    assert [(p.what, p.shard) for p in problems] == [("sha256_mismatch", SHARD)]


def test_an_index_that_disagrees_with_the_ledger_is_caught(run_copy):
    index = json.loads((run_copy / "index.json").read_text())
    index["shardlist"][0]["sha256"] = "0" * 64
    (run_copy / "index.json").write_text(json.dumps(index))
    assert whats(verify(run_copy)) == ["ledger_mismatch", "sha256_mismatch"]


def test_a_manifest_that_disagrees_with_the_shards_is_caught(run_copy):
    table = pq.read_table(run_copy / "manifest.parquet")
    rows = table.to_pylist()
    dropped, moved = rows[0]["key"], rows[1]["key"]
    rows = rows[1:]
    rows[0]["shard"] = "shards/train-000007.tar"
    pq.write_table(table.from_pylist(rows, schema=table.schema), run_copy / "manifest.parquet")
    problems = verify(run_copy)
    assert sorted((p.what, p.key) for p in problems) == [("manifest_missing_key", dropped), ("manifest_shard", moved)]


def test_a_key_in_two_shards_is_caught(run_copy):
    shutil.copy(run_copy / SHARD, run_copy / "shards/train-000001.tar")
    index = json.loads((run_copy / "index.json").read_text())
    index["shardlist"].append({**index["shardlist"][0], "url": "shards/train-000001.tar"})
    index["total_samples"] *= 2
    (run_copy / "index.json").write_text(json.dumps(index))
    problems = verify(run_copy)
    keys = {p.key for p in problems if p.what == "duplicate_key"}
    assert len(keys) == index["total_samples"] // 2
    assert ("ledger_mismatch", "shards/train-000001.tar") in {(p.what, p.shard) for p in problems}


def test_a_missing_cross_shard_is_caught(cross_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(cross_run, out)
    cross = next(p for p in (out / "shards").iterdir() if p.name.startswith("cross-"))
    cross.unlink()
    # Only the shard itself: the manifest rows of its samples are not reported again one by one.
    assert [(p.what, p.shard) for p in verify(out)] == [("missing_shard", f"shards/{cross.name}")]


def test_a_cross_sample_whose_json_names_another_key_is_caught(cross_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(cross_run, out)
    shard = next(e["url"] for e in json.loads((out / "index.json").read_text())["shardlist"] if "cross-" in e["url"])
    samples = list(wds.WebDataset(str(out / shard), shardshuffle=False))
    meta = json.loads(samples[0]["json"])
    meta["key"] = meta["cross_pair"]["base"]
    samples[0]["json"] = json.dumps(meta).encode()
    with wds.TarWriter(str(out / shard), encoder=False, mtime=0.0) as writer:
        for sample in samples:
            writer.write({k: v for k, v in sample.items() if k not in ("__url__", "__local_path__")})
    data = (out / shard).read_bytes()
    index = json.loads((out / "index.json").read_text())
    for entry in index["shardlist"]:
        if entry["url"] == shard:
            entry["filesize"], entry["sha256"] = len(data), hashlib.sha256(data).hexdigest()
    (out / "index.json").write_text(json.dumps(index))
    problems = [p for p in verify(out) if p.what != "ledger_mismatch"]  # the ledger still has the old checksum
    assert [(p.what, p.key) for p in problems] == [("key_mismatch", samples[0]["__key__"])]


def test_a_run_in_progress_and_an_empty_directory_are_reported(run_copy, tmp_path):
    (run_copy / "shards/train-000001.tar.tmp").write_bytes(b"\0" * 1024)
    assert [(p.what, p.shard) for p in verify(run_copy)] == [("uncommitted_shard", "shards/train-000001.tar.tmp")]
    (run_copy / "index.json").unlink()
    problems = verify(run_copy)
    assert whats(problems) == ["no_index"] and "resume" in problems[0].detail
    empty = tmp_path / "empty"
    empty.mkdir()
    assert whats(verify(empty)) == ["no_index"]


# ---------------------------------------------------------------------------------------------------------------
# Directories made elsewhere (issue 20): each hostile shape is a named problem, and nothing is inflated or followed


@pytest.fixture
def cross_copy(cross_run, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(cross_run, out)
    return out


def _prepend(out: Path, raw: bytes) -> None:
    """Put `raw` (tar member bytes) first in the first own shard and reseal it (index.json and ledger updated)."""
    path = out / SHARD
    path.write_bytes(raw + path.read_bytes())
    hostile.reseal(out, SHARD)


@pytest.mark.parametrize("raw, what, says", [
    (hostile.header("k0-0000000-0000001.mp4", 0, kind=tarfile.SYMTYPE, linkname="/etc/passwd"), "irregular_member",
     "a symbolic link"),
    (hostile.header("k0-0000000-0000001.mp4", 0, kind=tarfile.CHRTYPE, devmajor=1, devminor=3), "irregular_member",
     "a device"),
    (hostile.header("k0-0000000-0000001.mp4", 0, kind=tarfile.FIFOTYPE), "irregular_member", "a FIFO"),
    (hostile.sparse_gnu("k0-0000000-0000001.mp4", 2 << 30), "irregular_member", "a sparse file"),
    (hostile.member("README", b"hello"), "unsafe_name", "'README' is not KEY.PART"),
    (hostile.member("x.y/z", b"hello"), "unsafe_name", "'x.y/z' is not KEY.PART"),
])
def test_a_shard_holding_a_member_that_is_not_ours_never_verifies_ok(cross_copy, raw, what, says):
    _prepend(cross_copy, raw)
    problems = verify(cross_copy)
    assert [(p.what, p.shard) for p in problems if p.what == what] == [(what, SHARD)], problems
    assert says in next(p.detail for p in problems if p.what == what)


def test_a_compressed_shard_is_reported_and_not_inflated(cross_copy):
    (cross_copy / SHARD).write_bytes(hostile.gzip_bomb(4 << 30))  # ~4 MB on disk, 4 GiB inflated
    hostile.reseal(cross_copy, SHARD)
    problems = verify(cross_copy)
    shard_problems = {p.what for p in problems if p.shard == SHARD}
    # Its samples are missing (manifest, ledger keys), but it was never read as a tar: no "unreadable" after it.
    assert "compressed_shard" in shard_problems and "unreadable" not in shard_problems, problems


def test_links_and_fifos_in_shards_are_reported_and_never_opened(cross_copy, tmp_path):
    (tmp_path / "elsewhere.tar").write_bytes((cross_copy / SHARD).read_bytes())
    (cross_copy / SHARD).unlink()
    (cross_copy / SHARD).symlink_to(tmp_path / "elsewhere.tar")
    os.mkfifo(cross_copy / "shards" / "train-999999.tar")
    problems = verify(cross_copy)
    unsafe = sorted((p.shard, p.detail.split(";")[0][-30:]) for p in problems if p.what == "unsafe_file")
    assert [shard for shard, _ in unsafe] == [SHARD, SHARD, "shards/train-999999.tar"], problems


def test_an_index_entry_whose_url_is_not_text_is_reported(cross_copy):
    index = json.loads((cross_copy / "index.json").read_text())
    index["shardlist"].append({"url": ["shards", "x.tar"], "nsamples": "many", "filesize": 1, "sha256": "0"})
    (cross_copy / "index.json").write_text(json.dumps(index))
    problems = verify(cross_copy)  # before: TypeError (unhashable list)
    assert any(p.what == "bad_index" and "['shards', 'x.tar']" in p.detail for p in problems), problems


def test_a_manifest_declaring_millions_of_rows_is_not_read(cross_copy):
    import pyarrow as pa

    rows = 12_000_000
    key = pa.DictionaryArray.from_arrays(pa.array(np.zeros(rows, dtype=np.int32)), pa.array(["k"]))
    pq.write_table(pa.table({"key": key, "shard": key}), cross_copy / "manifest.parquet", compression="zstd")
    assert (cross_copy / "manifest.parquet").stat().st_size < 400_000
    problems = verify(cross_copy)  # before: 4 GB, then MemoryError
    assert [p.what for p in problems if p.what.startswith("manifest")] == ["manifest_rows"], problems


def test_verify_output_shows_data_text_with_control_characters_escaped(cross_copy):
    from io import StringIO

    from rich.console import Console

    from pipeline.inspection.verify import print_verification

    _prepend(cross_copy, hostile.member("\x1b]52;c;cHduZWQ=\x07.json", b"{}"))
    buffer = StringIO()
    print_verification(verify_output(cross_copy), Console(file=buffer, force_terminal=True, width=400))
    printed = buffer.getvalue()
    assert "\x07" not in printed and "\x1b]52" not in printed and "\\x1b]52" in printed
