"""The one storage layer, against a real S3-compatible HTTP server (moto's server mode on 127.0.0.1) and a local
directory: URIs, atomic writes, paged listings, scratch copies, and credentials that never show up in messages."""

from __future__ import annotations

import os

import pytest

from pipeline.core.storage import LocalStorage, ObjectStorage, StorageError, UnsafeFile, check_uri, open_storage


@pytest.fixture(scope="module")
def s3(s3_server):
    s3_server.create_bucket("store-test")
    return s3_server


def test_uris_are_checked_before_anything_is_touched(tmp_path):
    assert check_uri(str(tmp_path / "o")) == str(tmp_path / "o")
    assert check_uri(f"file://{tmp_path}/o") == str(tmp_path / "o")
    assert check_uri("s3://bucket/a/b/") == "s3://bucket/a/b"
    assert check_uri("gs://bucket") == "gs://bucket"
    for bad, said in [("http://host/x", "http:// scheme is not supported"), ("s3://", "no bucket"),
                      ("s3://KEY:SECRET@bucket/x", "credentials do not belong in a URI"),
                      ("s3://bucket/x?versionId=1", "query strings"), ("file://otherhost/x", "file:///abs/path")]:
        with pytest.raises(StorageError, match=said) as raised:
            open_storage(bad)
        assert "SECRET" not in str(raised.value)
    assert isinstance(open_storage(tmp_path), LocalStorage)


def test_object_store_round_trip_and_atomic_writes(s3):
    store = open_storage("s3://store-test/round")
    assert isinstance(store, ObjectStorage) and not store.exists()
    store.write_text("a/x.json", '{"k": 1}')
    with store.open_write("a/big.bin") as f:
        for _ in range(20):
            f.write(os.urandom(1 << 20))  # 20 MB: a multipart upload
    assert store.info("a/big.bin").size == 20 << 20
    with pytest.raises(RuntimeError), store.open_write("a/half.bin") as f:
        f.write(b"partial")
        raise RuntimeError("the writer failed")
    assert store.info("a/half.bin") is None  # nothing half-written is ever visible
    with store.open_read("a/big.bin") as f:
        f.seek((20 << 20) - 4)
        assert len(f.read()) == 4
    with store.local_copy("a/x.json") as local:
        assert local.read_text() == '{"k": 1}'
    assert not local.exists()  # the scratch copy goes with the block
    assert store.read_text("a/x.json") == '{"k": 1}' and store.exists("a")
    with pytest.raises(FileNotFoundError):
        store.read_bytes("a/missing")
    assert store.delete_tree("a") == 2 and not store.exists()


def test_a_listing_streams_page_by_page(s3):
    store = open_storage("s3://store-test/many")
    import obstore

    names = [f"v/{i:05d}.mp4" for i in range(2101)]
    for rel in names:  # obstore directly: the layer's write is one request each too, just slower to call
        obstore.put(store.store, f"many/{rel}", b"x")
    listing = store.list("v")
    assert iter(listing) is listing  # a generator: pages are fetched as it is consumed, never all up front
    assert next(listing).rel == names[0]
    assert [e.rel for e in listing] == names[1:]  # 3 pages of up to 1000 keys, in key order


def test_credentials_never_appear_in_errors(s3, monkeypatch):
    store = open_storage("s3://store-test/creds")
    store.write_text("x", "1")
    wrong = "wrong-secret-" + "z" * 20
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3.endpoint + "/")  # a new client, with the wrong key
    with pytest.raises(OSError) as raised:
        open_storage("s3://no-such-bucket/x").read_bytes("y")
    assert wrong not in str(raised.value) and s3.secret not in str(raised.value)


def test_local_writes_are_atomic_and_leave_no_temporary_files(tmp_path):
    store = open_storage(tmp_path / "out")
    store.write_text("shards/a.tar", "data")
    with pytest.raises(RuntimeError), store.open_write("shards/b.tar") as f:
        f.write(b"half")
        raise RuntimeError
    assert sorted(p.name for p in (tmp_path / "out" / "shards").iterdir()) == ["a.tar"]
    assert [e.rel for e in store.list()] == ["shards/a.tar"]
    assert store.local_path("shards/a.tar") == tmp_path / "out" / "shards" / "a.tar"


# ---------------------------------------------------------------------------------------------------------------
# A strict local directory (an output directory, which may come from elsewhere)


@pytest.fixture
def shared_copy(tmp_path):
    """An output directory with a link to a file outside it, a linked folder, and a FIFO named like a shard."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.tar").write_bytes(b"outside data")
    out = tmp_path / "out"
    (out / "shards").mkdir(parents=True)
    (out / "shards" / "train-000000.tar").write_bytes(b"ours")
    (out / "shards" / "train-000001.tar").symlink_to(outside / "secret.tar")
    (out / "shards" / "linked").symlink_to(outside)
    os.mkfifo(out / "shards" / "train-000002.tar")
    return out, outside


def test_strict_storage_reads_only_regular_files_and_follows_no_link(shared_copy):
    out, _ = shared_copy
    storage = open_storage(out, strict=True)
    assert storage.read_bytes("shards/train-000000.tar") == b"ours"
    with pytest.raises(UnsafeFile, match="is a symbolic link"):
        storage.read_bytes("shards/train-000001.tar")
    with pytest.raises(UnsafeFile, match="a FIFO, not a regular file"):  # refused at once: no wait for a writer
        storage.open_read("shards/train-000002.tar")
    with pytest.raises(UnsafeFile, match="is a symbolic link"):
        storage.info("shards/linked/secret.tar")
    assert [e.rel for e in storage.list("shards")] == ["shards/train-000000.tar"]
    assert sorted(storage.irregular("shards")) == [("shards/linked", "a symbolic link"),
                                                   ("shards/train-000001.tar", "a symbolic link"),
                                                   ("shards/train-000002.tar", "a FIFO")]
    # Not strict (inputs: a folder of linked videos is normal), links are followed.
    assert open_storage(out).read_bytes("shards/train-000001.tar") == b"outside data"


def test_strict_storage_never_deletes_or_writes_through_a_link(tmp_path, shared_copy):
    out, outside = shared_copy
    (out / "staging").symlink_to(outside)
    storage = open_storage(out, strict=True)
    storage.delete("shards/train-000001.tar")  # the link goes, not its target
    assert not (out / "shards" / "train-000001.tar").exists() and (outside / "secret.tar").exists()
    assert storage.delete_tree("staging") == 0 and not (out / "staging").exists()
    (out / "staging").symlink_to(outside)
    with pytest.raises(UnsafeFile):
        storage.delete("shards/linked/secret.tar")
    with pytest.raises(UnsafeFile):
        storage.write_bytes("staging/x.tar", b"x")
    assert sorted(p.name for p in outside.iterdir()) == ["secret.tar"]
    assert (outside / "secret.tar").read_bytes() == b"outside data"
