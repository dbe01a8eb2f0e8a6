"""The shard loader: real pipeline shards and synthetic ones in the same format, read through upstream webdataset."""

from __future__ import annotations

import io
import json
import logging
import random
import tarfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from pipeline.core.video import ClipEncoder
from pipeline.testing import synthetic_shards as synthetic
from trainer.data import (
    DataConfig,
    SampleError,
    _clip_facts,
    choose_bucket,
    frame_indices,
    letterbox,
    make_loader,
    resolve_shards,
)

BUCKETS = [(9, 64, 112), (9, 64, 64), (9, 112, 64)]
# SIZES of the synthetic clips (width, height) -> the bucket each must land in
EXPECTED_BUCKET = {(96, 64): (9, 64, 112), (64, 96): (9, 112, 64), (80, 80): (9, 64, 64)}


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> list[Path]:
    """12 samples (0..3 references each, three aspect ratios) in 3 shards of 4."""
    return synthetic.write_synthetic_shards(tmp_path_factory.mktemp("syn"), 12, max_refs=3, samples_per_shard=4)


def config(shards, **kw) -> DataConfig:
    return DataConfig(shards=[str(s) for s in shards] if isinstance(shards, list) else str(shards),
                      **{"buckets": BUCKETS, "epochs": 1, "batch_size": 2, **kw})


def all_batches(cfg: DataConfig, rank: int = 0, world_size: int = 1) -> list[dict]:
    return list(make_loader(cfg, rank, world_size))


def check_contract(batch: dict) -> None:
    b = batch["video"].shape[0]
    k = batch["refs"].shape[1]
    assert batch["video"].dtype == torch.float32 and batch["refs"].dtype == torch.float32
    assert batch["video"].shape[1] == 3 and batch["refs"].shape[0] == b and batch["refs"].shape[2] == 3
    assert batch["video"].min() >= -1.0 and batch["video"].max() <= 1.0 and batch["video"].std() > 0.05
    assert batch["ref_valid"].dtype == torch.bool and batch["ref_valid"].shape == (b, k)
    for name in ("ref_subject", "ref_view", "ref_group", "ref_kind"):
        assert batch[name].dtype == torch.long and batch[name].shape == (b, k)
        assert (batch[name][~batch["ref_valid"]] == -1).all() and (batch[name][batch["ref_valid"]] >= 0).all()
    assert (batch["refs"][~batch["ref_valid"]] == 0).all()  # padding is neutral grey
    assert len(batch["caption"]) == len(batch["subject_words"]) == len(batch["key"]) == b


def ids_of(batch: dict, i: int) -> list[tuple[int, int, int, int]]:
    """(subject, view, group, kind) of sample i's valid references."""
    valid = batch["ref_valid"][i]
    return list(zip(*(batch[n][i][valid].tolist() for n in ("ref_subject", "ref_view", "ref_group", "ref_kind"))))


def expected_refs(meta: dict, background: bool = True) -> list[tuple[int, int, int, int]]:
    """(subject, view, group, kind) per reference, read off KEY.json the way shard-format.md describes it."""
    entities = meta["entities"]
    n_groups = sum(1 for e in entities if e.get("group"))
    refs, objects = [], []
    for e in entities:
        for ref in e.get("references", []):
            if e["kind"] == "subject":
                group = int(ref["group"][1:])
            else:  # one group per object entity, whatever its number of views
                if e["id"] not in objects:
                    objects.append(e["id"])
                group = n_groups + objects.index(e["id"])
            refs.append((ref["subject_id"], ref["view_id"], group, 0 if e["kind"] == "subject" else 1))
    slots = max((ref[0] for ref in refs), default=-1) + 1  # the plate takes the slot after the entities'
    if background and meta["background"]:
        refs.append((slots, 0, n_groups + len(objects), 2))
    return refs


def test_reads_the_pipelines_shards(curated_out):
    urls = resolve_shards(curated_out)
    index = json.loads((curated_out / "index.json").read_text())
    assert urls == [str(curated_out / e["url"]) for e in index["shardlist"]]
    assert resolve_shards(curated_out / "shards") == resolve_shards(curated_out / "index.json") == urls
    metas = synthetic.read_meta(urls)
    batches = all_batches(DataConfig(shards=str(curated_out), epochs=1, batch_size=2, max_refs=4))
    assert sorted(k for b in batches for k in b["key"]) == sorted(metas)
    for batch in batches:
        check_contract(batch)
        for i, key in enumerate(batch["key"]):
            meta = metas[key]
            assert batch["caption"][i] == meta["caption"]["text"]
            got = ids_of(batch, i)
            assert got == expected_refs(meta) and len(got) >= 2  # the real run: its references and the plate
            word = next(e["word"] for e in meta["entities"] if e.get("subject_id") == 0)
            assert batch["subject_words"][i][0].split(", ")[0] == word


def test_batches_hold_the_references_and_ids_of_each_sample(shards):
    metas = synthetic.read_meta(shards)
    batches = all_batches(config(shards, max_refs=4, shuffle_buffer=0))
    assert sorted(k for b in batches for k in b["key"]) == sorted(metas)
    for batch in batches:
        check_contract(batch)
        counts = batch["ref_valid"].sum(1).tolist()
        assert batch["refs"].shape[1] == max(counts)  # K: the batch's largest reference count
        for i, key in enumerate(batch["key"]):
            valid = batch["ref_valid"][i]
            assert valid[: counts[i]].all() and not valid[counts[i] :].any()  # padding after the real ones
            got = ids_of(batch, i)
            assert got == expected_refs(metas[key])
    by_key = {k: (b, i) for b in batches for i, k in enumerate(b["key"])}
    # Hand-checked: sample 3 references rocket, tabby cat (objects) and the woman (g0); the cup has no reference.
    sample3 = next(k for k, m in metas.items() if m["caption"]["text"].startswith("A rocket and a tabby cat"))
    batch, i = by_key[sample3]
    assert batch["ref_subject"][i, :4].tolist() == [0, 1, 2, 3]
    assert batch["ref_kind"][i, :4].tolist() == [1, 1, 0, 2]
    assert batch["ref_group"][i, :4].tolist() == [1, 2, 0, 3]  # objects and the plate after the one subject group
    assert batch["subject_words"][i] == ["rocket", "tabby cat", "woman, orange, spacesuit", "grassy lawn"]
    # Sample 7: the man (g0) and two objects have references, the woman (g1) none: objects start at group 2.
    sample7 = next(k for k, m in metas.items() if m["caption"]["text"].startswith("A man with a camera and a rocket "
                                                                                  "and a tabby cat and a woman"))
    batch, i = by_key[sample7]
    assert batch["ref_group"][i, :4].tolist() == [0, 2, 3, 4] and batch["ref_kind"][i, :4].tolist() == [0, 1, 1, 2]


def test_max_refs_truncates_in_entity_order_and_pads_to_k(shards):
    metas = synthetic.read_meta(shards)
    for batch in all_batches(config(shards, max_refs=2, pad_to_max_refs=True, background_ref=False)):
        assert batch["refs"].shape[1] == 2
        for i, key in enumerate(batch["key"]):
            want = expected_refs(metas[key], background=False)[:2]
            valid = batch["ref_valid"][i]
            assert list(zip(batch["ref_subject"][i][valid].tolist(), batch["ref_kind"][i][valid].tolist())) == [
                (s, kind) for s, _, _, kind in want]


def test_batches_without_any_reference(tmp_path):
    paths = synthetic.write_synthetic_shards(tmp_path, 4, max_refs=0)
    batches = all_batches(config(paths, batch_size=4, buckets=[(9, 64, 64)]))
    assert len(batches) == 1
    batch = batches[0]
    check_contract(batch)
    assert batch["refs"].shape == (4, 0, 3, 64, 64) and batch["ref_subject"].shape == (4, 0)
    assert batch["subject_words"] == [[], [], [], []]


def test_clip_facts_missing_from_the_json_are_read_from_the_mp4():
    encoder = ClipEncoder(96, 64, 12)
    for i in range(7):
        encoder.add(np.full((64, 96, 3), 30 * i, np.uint8))
    mp4 = encoder.finish()
    assert _clip_facts({}, mp4) == (96, 64, 7)
    assert _clip_facts({"clip": {"width": 8, "height": 6, "num_frames": 3}}, mp4) == (8, 6, 3)  # the json wins
    with pytest.raises(SampleError, match="the sample's mp4: FFmpeg cannot open it"):
        _clip_facts({}, b"not a video at all")


def test_every_batch_shares_one_bucket_chosen_by_aspect(shards):
    metas = synthetic.read_meta(shards)
    batches = all_batches(config(shards, batch_size=3, frame_stride=2, ref_size=(32, 48)))
    for batch in batches:
        buckets = {EXPECTED_BUCKET[(metas[k]["clip"]["width"], metas[k]["clip"]["height"])] for k in batch["key"]}
        assert len(buckets) == 1
        f, h, w = buckets.pop()
        assert batch["video"].shape[2:] == (f, h, w)
        assert batch["refs"].shape[3:] == (32, 48)
    assert sorted(len(b["key"]) for b in batches) == [1, 1, 1, 3, 3, 3]  # 4 clips per aspect: a full batch and 1


def test_bucket_and_frame_choice():
    buckets = [(17, 64, 64), (9, 64, 64), (5, 64, 112)]
    assert choose_bucket(buckets, 200, 100, 100, 2) == (5, 64, 112)  # aspect first
    assert choose_bucket(buckets, 64, 64, 40, 2) == (17, 64, 64)  # 33 source frames fit
    assert choose_bucket(buckets, 64, 64, 20, 2) == (9, 64, 64)  # 17 at stride 2 fit, 33 do not
    assert choose_bucket(buckets, 64, 64, 12, 2) == (9, 64, 64)  # 9 fit at stride 1
    assert choose_bucket(buckets, 64, 64, 4, 2) == (9, 64, 64)  # nothing fits: the fewest frames
    rng = random.Random(0)
    assert frame_indices(20, 9, 2, "start", rng) == list(range(0, 17, 2))
    assert frame_indices(20, 9, 2, "center", rng) == list(range(1, 18, 2))
    assert frame_indices(12, 9, 2, "start", rng) == list(range(9))  # stride lowered to fit
    assert frame_indices(4, 6, 2, "start", rng) == [0, 1, 2, 3, 3, 3]  # the last frame repeats
    starts = {frame_indices(40, 9, 2, "random", rng)[0] for _ in range(50)}
    assert starts <= set(range(24)) and len(starts) > 5


def test_letterbox_composites_alpha_and_pads_on_grey():
    rgba = np.zeros((10, 20, 4), np.uint8)
    rgba[:, 10:] = (255, 0, 0, 255)  # right half opaque red, left half transparent
    out = letterbox(Image.fromarray(rgba, "RGBA"), 20, 20)
    assert out.shape == (3, 20, 20) and out.dtype == np.float32
    assert np.abs(out[:, :5]).max() < 1e-6 and np.abs(out[:, 15:]).max() < 1e-6  # letterbox bands: grey
    assert np.abs(out[:, 6:14, 1:9]).max() < 1e-6  # transparent: the same grey
    assert np.allclose(out[:, 6:14, 11:19], np.array([1.0, -1.0, -1.0])[:, None, None])


@pytest.mark.parametrize("per_shard", [2, 4, 10])  # 5 shards; 3 (rank 1 then has fewer than its workers); 1
def test_nodes_and_workers_split_the_data_disjointly_and_completely(tmp_path, per_shard):
    paths = synthetic.write_synthetic_shards(tmp_path, 10, max_refs=1, samples_per_shard=per_shard)
    metas = synthetic.read_meta(paths)
    per_rank = [[k for b in all_batches(config(paths, num_workers=2, seed=3), rank, 2) for k in b["key"]]
                for rank in range(2)]
    assert len(per_rank[0]) == len(set(per_rank[0])) and len(per_rank[1]) == len(set(per_rank[1]))
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) == set(metas)


def test_resampled_mode_yields_indefinitely(tmp_path):
    paths = synthetic.write_synthetic_shards(tmp_path, 3, max_refs=1, size=(64, 64))  # one shard of 3 samples
    for rank in range(2):  # one shard, two ranks: resampling still feeds both
        loader = make_loader(config(paths, resampled=True, epochs=None, buckets=[(9, 64, 64)]), rank, 2)
        batches = list(islice(loader, 10))
        assert len(batches) == 10 and sum(len(b["key"]) for b in batches) > 3 * 3
    endless = make_loader(config(paths, epochs=None, buckets=[(9, 64, 64)]))
    assert len(list(islice(endless, 8))) == 8  # without resampling, epochs repeat


def test_a_corrupt_member_is_skipped_and_reported(shards, tmp_path, caplog):
    bad = tmp_path / "train-000000.tar"
    keys = list(synthetic.read_meta([shards[0]]))
    victims = {"mp4": keys[0], "json": keys[1]}  # an undecodable clip, a truncated KEY.json
    with tarfile.open(shards[0]) as src, tarfile.open(bad, "w") as dst:
        for member in src.getmembers():
            payload = src.extractfile(member).read()
            key, ext = member.name.split(".", 1)
            if victims.get(ext) == key:
                payload = b"not an mp4" * 100 if ext == "mp4" else b"{truncated"
            member.size = len(payload)
            dst.addfile(member, io.BytesIO(payload))
    cut = tmp_path / "train-000001.tar"  # a shard cut mid-way: what precedes the cut still loads
    whole = shards[1].read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        keys = [k for b in all_batches(config([bad, cut, shards[2]], shuffle_buffer=0)) for k in b["key"]]
    good = set(synthetic.read_meta([shards[0], shards[2]])) - set(victims.values())
    assert good <= set(keys) and not set(victims.values()) & set(keys)
    assert 0 < len(set(keys) - good) < 4  # some of the cut shard's samples
    text = caplog.text
    assert f"{victims['mp4']} in {bad}" in text and "KEY.mp4" in text
    assert f"{victims['json']} in {bad}" in text and "JSON" in text
    assert str(cut) in text


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_yields_exactly_the_batches_the_run_would_have(shards, caplog, resampled):
    cfg = config(shards, epochs=None, num_workers=2, batch_size=2, seed=1, resampled=resampled)
    straight = list(islice(make_loader(cfg), 9))  # 6 batches per epoch: crosses an epoch boundary
    first = make_loader(cfg)
    head = list(islice(first, 3))  # odd: the resumed loader must start with the second worker's stream
    state = json.loads(json.dumps(first.state_dict()))
    assert state["samples_seen"] == sum(len(b["key"]) for b in head)
    resumed = make_loader(cfg)
    resumed.load_state_dict(state)
    tail = list(islice(resumed, 6))
    for a, b in zip(straight, head + tail, strict=True):
        assert a["key"] == b["key"] and torch.equal(a["video"], b["video"]) and torch.equal(a["refs"], b["refs"])
    assert [b["key"] for b in islice(first, 6)] == [b["key"] for b in tail]  # iterating again continues too
    other = make_loader(config(shards, epochs=None, num_workers=1, batch_size=2, seed=1, resampled=resampled))
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        other.load_state_dict(state)
    assert "num_workers" in caplog.text
    assert len(list(islice(other, 2))) == 2


def test_config_errors_name_the_key():
    with pytest.raises(ValidationError, match="buckets"):
        DataConfig(shards="x", buckets=[])
    with pytest.raises(ValidationError, match="batch_size"):
        DataConfig(shards="x", batch_size=0)
    with pytest.raises(ValidationError, match="nope"):
        DataConfig(shards="x", nope=1)


def test_views_and_attribute_references_keep_their_subjects_group_and_views():
    """A subject with two views and a 'top' attribute reference, and an object: LumosX puts the subject's three in
    one branch (one t) and the object in its own; TS-RoPE lays the subject's views at adjacent t."""
    from trainer.data import plan_references
    from trainer.positions import lumosx_branches, ref_offsets

    def ref(k, entity, subject, view, group=None, attribute=None):
        return {"file": f"ref{k}.png", "entity": entity, "subject_id": subject, "view_id": view, "group": group,
                "attribute": attribute, "tag": attribute}

    meta = {"entities": [
        {"id": "e0", "kind": "subject", "word": "person", "group": "g0", "subject_id": 0, "attributes": {},
         "references": [ref(0, "e0", 0, 0, "g0"), ref(1, "e0", 0, 1, "g0"), ref(2, "e0", 0, 0, "g0", "top")]},
        {"id": "e1", "kind": "object", "word": "car", "subject_id": 1, "references": [ref(3, "e1", 1, 0)]},
    ]}
    refs, _words = plan_references(meta, {f"ref{k}.png" for k in range(4)}, DataConfig(shards="x", max_refs=8))
    kinds, groups = [r.kind for r in refs], [r.group for r in refs]
    assert groups[:3] == [0, 0, 0] and groups[3] != 0
    branches = lumosx_branches(kinds, groups)
    assert branches == [0, 0, 0, 1]
    offsets = ref_offsets("lumosx", (3, 4, 4), [(2, 2)] * 4, [r.subject for r in refs], [r.view for r in refs],
                          kinds, groups)
    assert {t for t, _, _ in offsets[:3]} == {3} and offsets[3][0] == 4  # one t for the group, side by side in w
    assert [w for _, _, w in offsets[:3]] == [0, 2, 4]
    ts = ref_offsets("ts-rope", (3, 4, 4), [(2, 2)] * 4, [r.subject for r in refs], [r.view for r in refs],
                     kinds, groups)
    # T - 1 + delta(4) = 6 for the subject: view 0, its attribute (view 0, later), view 1 at 6, 7, 8; the object at
    # 8 + 4 = 12.
    assert [t for t, _, _ in ts] == [6, 8, 7, 12]
    # LumosX's self-attention mask: the subject's view and attribute tokens see each other, not the object's.
    from trainer.positions import lumosx_masks

    mask, _ = lumosx_masks((1, 1, 1), [(1, 1)] * 4, [r.subject for r in refs], kinds, groups,
                           torch.zeros(2, 3, dtype=torch.bool))
    refs_block = mask[1:, 1:]  # token 0 is the one video token
    assert refs_block[:3, :3].all() and not refs_block[:3, 3].any() and not refs_block[3, :3].any()


def test_max_refs_keeps_every_entitys_first_view_before_more_views_and_attributes():
    from trainer.data import plan_references

    def ref(k, entity, subject, view, attribute=None):
        return {"file": f"ref{k}.png", "entity": entity, "subject_id": subject, "view_id": view, "group": "g0",
                "attribute": attribute}

    meta = {"entities": [
        {"id": "e0", "kind": "subject", "word": "person", "group": "g0", "subject_id": 0,
         "references": [ref(0, "e0", 0, 0), ref(1, "e0", 0, 1), ref(2, "e0", 0, 0, "top"), ref(3, "e0", 0, 2)]},
        {"id": "e1", "kind": "object", "word": "car", "subject_id": 1, "references": [ref(4, "e1", 1, 0)]},
    ]}
    refs, _ = plan_references(meta, {f"ref{k}.png" for k in range(5)}, DataConfig(shards="x", max_refs=3,
                                                                                    background_ref=False))
    assert [r.member for r in refs] == ["ref0.png", "ref1.png", "ref4.png"]  # the car's only view is not cut off
