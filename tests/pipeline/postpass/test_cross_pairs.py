"""Cross-pair post-pass over a committed run: share, provenance, identities, plates, idempotence, crash safety.

The committed run is synthetic but written the way a real one is (ShardSink + ledger, real PNG references and
masks cut from skimage photos, unit face embeddings with faces.npy rows aligned to KEY.json "faces"). Only the
mp4 members are placeholder bytes: the pass copies them unchanged and never decodes them.
"""

import io
import json
import shutil
import tarfile
from collections import Counter

import numpy as np
import pytest
import webdataset as wds

from pipeline.core.config import ConfigError, OutputConfig, RunConfig, face_thresholds
from pipeline.postpass.cross_pairs import (
    SUBJECT_BOTTOM,
    SUBJECT_HEIGHT,
    build_cross_pairs,
    composite_on_plate,
    decode_png,
    target_count,
)
from pipeline.store.ledger import Ledger
from pipeline.store.outputs import cross_manifest_rows, cross_summary
from pipeline.store.shards import ShardSink, npy_bytes, sample_json
from pipeline.testing.synthetic_runs import (
    DIM,
    commit_sources,
    config,
    embedding,
    identity_of,
    run_pass,
    source_entry_and_samples,
)
from stages.metrics import face_flags, with_references


def cross_samples(out):
    """{key: {ext: bytes}} of every sample in the current cross shards, read with upstream webdataset."""
    entry = Ledger(out).read().cross
    urls = [str(out / s["shard"]) for s in entry["shards"]]
    if not urls:
        return {}
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def own_samples(out):
    state = Ledger(out).read()
    urls = [str(out / name) for name in sorted(state.shards)]
    return {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}


def identity_of_key(key):
    source, clip = int(key.split("-")[0], 16), int(key.split("-")[1]) // 100
    return identity_of(source, clip)


@pytest.fixture(scope="module")
def run200(tmp_path_factory):
    """A committed run of 200 own samples (40 sources x 5 clips) and its cross pass; read-only for the tests."""
    out = tmp_path_factory.mktemp("run200")
    commit_sources(out, range(40))
    result = run_pass(out)
    return out, result


def fresh_copy(run200, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(run200[0], out)
    return out


def test_realized_share_is_near_the_configured_one(run200):
    out, result = run200
    entry = Ledger(out).read().cross
    own = 200
    assert entry["target"] == target_count(0.4, own) == 133
    assert len(entry["samples"]) == len(cross_samples(out)) == 133
    assert abs(len(entry["samples"]) / (own + len(entry["samples"])) - 0.4) <= 0.05
    assert abs(result["share"] - 0.4) <= 0.05
    assert set(entry["kinds"]) == {"same_identity", "composite"}
    summary = cross_summary(Ledger(out).read())
    assert summary["samples"] == 133 and summary["kinds"] == entry["kinds"]
    assert sum(s["nsamples"] for s in entry["shards"]) == 133 and len(entry["shards"]) == 3  # 64 per shard


def test_every_file_named_in_a_cross_json_is_in_its_sample(run200):
    out, _ = run200
    entry = Ledger(out).read().cross
    shard_of = {row["key"]: row["shard"] for row in entry["samples"]}
    members: dict[str, set] = {}
    for shard in entry["shards"]:
        with tarfile.open(out / shard["shard"]) as tar:
            for name in tar.getnames():
                key, _, ext = name.partition(".")
                members.setdefault(key, set()).add(ext)
    assert set(members) == set(shard_of)
    for key, sample in cross_samples(out).items():
        meta = json.loads(sample["json"])
        assert meta["key"] == key == meta["cross_pair"]["base"] + "-x" and "." not in key
        named = {r[f] for e in meta["entities"] for r in e.get("references", []) for f in ("file", "mask")}
        if meta["background"]:
            named.add(meta["background"]["file"])
        assert named <= members[key], (key, named - members[key])
        assert {"mp4", "json", "faces.npy"} <= members[key]
        for e in meta["entities"]:
            for r in e.get("references", []):
                image = decode_png(sample[r["file"]])
                assert image.ndim == 3 and image.shape[2] == (4 if r["variant"] == "segment" else 3)
                assert decode_png(sample[r["mask"]]).shape == image.shape[:2]


def test_same_identity_references_come_from_another_clip_of_that_person(run200):
    out, _ = run200
    own = own_samples(out)
    seen, same_source = 0, 0
    for sample in cross_samples(out).values():
        meta = json.loads(sample["json"])
        base = meta["cross_pair"]["base"]
        assert sample["mp4"] == own[base]["mp4"] and sample.get("bg.png") == own[base].get("bg.png")
        for entity in meta["entities"]:
            for ref in entity.get("references", []):
                if ref["cross"]["kind"] != "same_identity":
                    continue
                seen += 1
                partner = ref["cross"]["from_key"]
                assert ref["source_key"] == partner != base
                assert ref["source_clip"] == json.loads(own[partner]["json"])["clip_id"] != meta["clip_id"]
                assert identity_of_key(partner) == identity_of_key(base)
                assert entity["id"] == ref["entity"] == "e0" and ref["cross"]["similarity"] >= 0.8
                assert sample[ref["file"]] == own[partner][ref["cross"]["from_file"]]
                same_source += partner.split("-")[0] == base.split("-")[0]
                # Sources 0-29 share each person with another source: the partner is taken from there.
                if int(base.split("-")[0], 16) < 30:
                    assert partner.split("-")[0] != base.split("-")[0]
    assert seen > 40 and same_source > 0  # sources 30-34 only have partners in their own other clips


def test_composites_paste_the_base_subject_on_a_plate_of_another_source(run200):
    out, _ = run200
    own = own_samples(out)
    seen = Counter()
    for sample in cross_samples(out).values():
        meta = json.loads(sample["json"])
        base = meta["cross_pair"]["base"]
        for entity in meta["entities"]:
            for ref in entity.get("references", []):
                if ref["cross"]["kind"] != "composite":
                    continue
                donor = ref["cross"]["background_from"]
                assert donor == meta["cross_pair"]["background_from"]
                assert donor.split("-")[0] != base.split("-")[0]
                own_entity = next(e for e in json.loads(own[base]["json"])["entities"] if e["id"] == entity["id"])
                assert ref["source_key"] == base and ref["variant"] == own_entity["references"][0]["variant"]
                plate = decode_png(own[donor]["bg.png"])
                image, mask = decode_png(sample[ref["file"]]), decode_png(sample[ref["mask"]]) > 0
                x0, y0, x1, y1 = ref["cross"]["placed_box"]
                outside = np.ones(mask.shape, bool)
                outside[y0:y1, x0:x1] = False
                assert image.shape[:2] == plate.shape[:2] and mask[y0:y1, x0:x1].mean() > 0.5
                assert np.array_equal(image[..., :3][outside], plate[outside]) and not mask[outside].any()
                seen[entity["kind"]] += 1
    # Objects never have a face; people seen in one clip only have no partner: both are composited.
    assert seen["object"] > 0 and seen["subject"] > 0


def test_rerun_with_the_same_own_samples_writes_nothing(run200, tmp_path):
    out = fresh_copy(run200, tmp_path)
    ledger_before = (out / "ledger.jsonl").read_bytes()
    files_before = {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()}
    assert run_pass(out) is None  # recover() inside keeps the current cross shards
    assert (out / "ledger.jsonl").read_bytes() == ledger_before
    assert {p.name: p.stat().st_mtime_ns for p in (out / "shards").iterdir()} == files_before


def test_new_own_samples_replace_the_cross_set_without_duplicates(run200, tmp_path):
    out = fresh_copy(run200, tmp_path)
    old = {s["shard"] for s in Ledger(out).read().cross["shards"]}
    commit_sources(out, range(40, 46))  # 30 more own samples
    result = run_pass(out)
    state = Ledger(out).read()
    new = {s["shard"] for s in state.cross["shards"]}
    assert result is not None and not old & new
    assert not any((out / name).exists() for name in old)
    on_disk = {f"shards/{p.name}" for p in (out / "shards").iterdir()}
    assert on_disk == set(state.shards) | new
    keys = Counter()
    for name in sorted(on_disk):
        keys.update(s["__key__"] for s in wds.WebDataset(str(out / name), shardshuffle=False))
    assert len(keys) == 230 + state.cross["target"] and max(keys.values()) == 1
    assert state.cross["target"] == target_count(0.4, 230)
    rows = cross_manifest_rows(state)
    assert len(rows) == len(state.cross["samples"]) and all(r["source_id"] and r["cross_base"] for r in rows)


class DiesAtCross(Ledger):
    """A kill around the cross commit: before its line (`after=False`) or right after it (`after=True`)."""

    def __init__(self, out_dir, after):
        super().__init__(out_dir)
        self.after = after

    def append(self, entry):
        if entry["type"] == "cross" and not self.after:
            raise KeyboardInterrupt
        super().append(entry)
        if entry["type"] == "cross":
            raise KeyboardInterrupt


def test_a_crash_before_the_ledger_line_leaves_shards_that_recover_removes(run200, tmp_path):
    out = fresh_copy(run200, tmp_path)
    committed = Ledger(out).read().cross
    commit_sources(out, range(40, 42))
    ledger = DiesAtCross(out, after=False)
    with pytest.raises(KeyboardInterrupt):
        build_cross_pairs(out, config(), ledger, ledger.recover())
    written = {f"shards/{p.name}" for p in (out / "shards").glob("cross-*")} - committed_names(committed)
    assert written  # the new set reached the disk, renamed, but never committed
    state = Ledger(out).recover()
    assert state.cross == committed
    assert {f"shards/{p.name}" for p in (out / "shards").glob("cross-*")} == committed_names(committed)
    assert run_pass(out)["own"] == 210


def test_a_crash_after_the_ledger_line_leaves_superseded_shards_that_recover_removes(run200, tmp_path):
    out = fresh_copy(run200, tmp_path)
    old = committed_names(Ledger(out).read().cross)
    commit_sources(out, range(40, 42))
    ledger = DiesAtCross(out, after=True)
    with pytest.raises(KeyboardInterrupt):
        build_cross_pairs(out, config(), ledger, ledger.recover())
    assert all((out / name).exists() for name in old)
    state = Ledger(out).recover()
    assert not any((out / name).exists() for name in old)
    assert all((out / name).exists() for name in committed_names(state.cross)) and state.cross["own"] == 210
    assert run_pass(out) is None


def committed_names(entry):
    return {s["shard"] for s in entry["shards"]}


def test_share_zero_or_a_single_source_commits_an_empty_set(tmp_path):
    one = tmp_path / "one"
    commit_sources(one, [3])
    result = run_pass(one)
    assert result["shards"] == [] and result["share"] == 0.0 and "1 sources" in result["info"]["reason"]
    assert cross_summary(Ledger(one).read())["samples"] == 0

    off = tmp_path / "off"
    commit_sources(off, [0, 2])
    result = run_pass(off, config(share=0.0))
    assert result["shards"] == [] and result["target"] == 0
    assert not list((off / "shards").glob("cross-*")) and run_pass(off, config(share=0.0)) is None
    # Turning it on later (same own samples, other settings) builds the set.
    result = run_pass(off)
    assert result["target"] == target_count(0.4, 10) and result["shards"] and result["kinds"]


def test_a_share_beyond_one_base_per_sample_is_capped_and_said(tmp_path):
    out = tmp_path / "out"
    commit_sources(out, [0, 1, 2])  # 15 own samples, 14 with references
    result = run_pass(out, config(share=0.9))
    assert result["target"] == 135 and result["info"]["capped"] and "capped at 15" in result["info"]["note"]
    rows = Ledger(out).read().cross["samples"]
    assert len(rows) == 14 and len({r["base"] for r in rows}) == 14
    assert result["info"]["skipped"] == {"no_references": 1}


def test_the_split_name_cross_is_refused(tmp_path):
    cfg = RunConfig.model_validate({"output": {"split": "cross"}})
    with pytest.raises(ConfigError, match="output.split 'cross'"):
        build_cross_pairs(tmp_path, cfg, Ledger(tmp_path), Ledger(tmp_path).read())


def test_composite_geometry():
    plate = np.full((200, 300, 3), 50, np.uint8)
    reference = np.zeros((40, 30, 4), np.uint8)
    reference[..., :3] = 220
    mask = np.zeros((40, 30), np.uint8)
    mask[10:30, 5:25] = 1  # the subject is 20 x 20 inside its reference
    image, placed, (x0, y0, x1, y1) = composite_on_plate(reference, mask, plate)
    assert image.shape == (200, 300, 3) and placed.shape == (200, 300)
    assert y1 - y0 == round(SUBJECT_HEIGHT * 200) and y1 == round(SUBJECT_BOTTOM * 200)
    assert abs((x0 + x1) / 2 - 150) <= 1
    assert placed[y0:y1, x0:x1].all() and placed.sum() == (y1 - y0) * (x1 - x0)
    assert (image[placed > 0] == 220).all() and (image[placed == 0] == 50).all()
    # A wide subject is bounded by the plate width instead.
    wide = np.ones((10, 100), np.uint8)
    _, _, (x0, _, x1, _) = composite_on_plate(np.zeros((10, 100, 3), np.uint8), wide, plate)
    assert x1 - x0 == 270


def test_with_two_sources_every_plate_comes_from_the_other_one(tmp_path):
    commit_sources(tmp_path, [35, 36])  # a new person in every clip: nothing but composites
    result = run_pass(tmp_path)
    assert set(result["kinds"]) == {"composite"} and result["target"] == 7
    for sample in cross_samples(tmp_path).values():
        meta = json.loads(sample["json"])
        base, donor = meta["cross_pair"]["base"], meta["cross_pair"]["background_from"]
        assert donor.split("-")[0] != base.split("-")[0]


def with_object_embeddings(source: int, category: str):
    """A source whose clip-1 object (entity e1, detection d1) has a CLIP crop embedding in KEY.dclip.npy: sources
    2s and 2s+1 hold the same object (as they hold the same person)."""
    entry, samples = source_entry_and_samples(source)
    for sample in samples:
        meta = json.loads(sample["json"])
        if not any(e["id"] == "e1" for e in meta["entities"]):
            continue
        for entity in meta["entities"]:
            if entity["id"] == "e1":
                entity["category"] = category
        meta["detections"] = [{"id": "d0"}, {"id": "d1"}]
        sample["json"] = sample_json(meta)
        sample["dclip.npy"] = npy_bytes(np.stack([np.zeros(DIM, np.float32),
                                                  embedding(5_000_000 + source // 2, sample["__key__"])]))
    return entry, samples


def test_objects_with_crop_embeddings_pair_with_the_same_object_elsewhere(tmp_path):
    ledger = Ledger(tmp_path)
    sink = ShardSink(tmp_path, OutputConfig(), ledger, ledger.recover())
    # Sources 0-3 hold mugs (0~1 and 2~3 the same one); 4-5 a cup (4~5) whose crop embeddings are those of the
    # mug of 0-1: only the category keeps the cup from pairing with that mug.
    for source in range(4):
        sink.add_source(*with_object_embeddings(source, "mug"))
    for source in (4, 5):
        sink.add_source(*_renamed(source, "cup"))
    sink.close()
    result = run_pass(tmp_path, config(share=0.5))
    assert result["info"]["object_references"] == 6
    swapped = 0
    for key, sample in cross_samples(tmp_path).items():
        meta = json.loads(sample["json"])
        for ref in (r for e in meta["entities"] if e["id"] == "e1" for r in e["references"]):
            if ref.get("cross", {}).get("kind") != "same_identity":
                continue
            swapped += 1
            base, partner = int(key.split("-")[0], 16), int(ref["cross"]["from_key"].split("-")[0], 16)
            assert partner != base and partner // 2 == base // 2
            assert sample[ref["file"]] == own_samples(tmp_path)[ref["cross"]["from_key"]][ref["cross"]["from_file"]]
    assert swapped >= 1


def _renamed(source: int, category: str):
    """Source `source` with the object embeddings of source `source - 4` (same vectors, other category)."""
    entry, samples = with_object_embeddings(source - 4, category)
    old, new = f"{source - 4:016x}", f"{source:016x}"
    entry = json.loads(json.dumps(entry).replace(old, new).replace(f"/v/{source - 4}.mp4", f"/v/{source}.mp4"))
    renamed = []
    for sample in samples:
        sample = {k: (v.replace(old.encode(), new.encode()) if k in ("json", "mp4") else v) for k, v in sample.items()}
        sample["__key__"] = sample["__key__"].replace(old, new)
        renamed.append(sample)
    return entry, renamed


def with_metrics(source: int):
    """A source whose KEY.json carries stats.metrics as stages/metrics.py writes them, with a second face of the
    subject (keyframe 0) so that its identity has another view to be measured against."""
    entry, samples = source_entry_and_samples(source)
    thresholds = face_thresholds(None, None, "dlib")
    for sample in samples:
        key = sample["__key__"]
        meta = json.loads(sample["json"])
        meta["faces"].append({"detection": "d5", "entity": "e0", "keyframe": 0, "box": [12, 5, 32, 25], "score": 0.9,
                              "frontal": True})
        table = np.load(io.BytesIO(sample["faces.npy"]))
        table = np.vstack([table, embedding(identity_of(source, int(key.split("-")[1]) // 100), key + "kf0")])
        references = []
        for entity in meta["entities"]:
            for ref in entity.get("references") or []:
                measured = {"file": ref["file"], "entity": entity["id"], "variant": ref["variant"], "clip_i": 0.7,
                            "background_similarity": 0.9}
                if entity["kind"] == "subject":
                    measured["face_cosine"] = round(float(table[1] @ table[2]), 4)
                    measured.update(face_flags(measured["face_cosine"], thresholds))
                references.append(measured)
        meta["stats"] = {"metrics": with_references({"backends": {"face": "dlib", "background": "hsv"},
                                                     "caption_alignment": 0.3}, references)}
        sample["json"] = sample_json(meta)
        sample["faces.npy"] = npy_bytes(table)
    return entry, samples


def test_a_replaced_reference_loses_its_metrics_but_its_face_is_measured_again(tmp_path):
    ledger = Ledger(tmp_path)
    sink = ShardSink(tmp_path, OutputConfig(), ledger, ledger.recover())
    for source in range(8):
        sink.add_source(*with_metrics(source))
    sink.close()
    run_pass(tmp_path, config(share=0.5))
    own = own_samples(tmp_path)
    tables = {key: np.load(io.BytesIO(s["faces.npy"])) for key, s in own.items()}
    seen = Counter()
    for sample in cross_samples(tmp_path).values():
        meta = json.loads(sample["json"])
        base = meta["cross_pair"]["base"]
        before = {r["file"]: r for r in json.loads(own[base]["json"])["stats"]["metrics"]["references"]}
        metrics = meta["stats"]["metrics"]
        refs = {r["file"]: r for e in meta["entities"] for r in e.get("references") or []}
        replaced = sorted(f for f, r in refs.items() if "cross" in r)
        assert metrics["replaced"] == replaced and replaced
        assert metrics["caption_alignment"] == 0.3 and metrics["backends"] == {"face": "dlib", "background": "hsv"}
        for measured in metrics["references"]:
            ref = refs[measured["file"]]
            if measured["file"] not in replaced:
                assert measured == before[measured["file"]]
                continue
            kind = ref["cross"]["kind"]
            seen[kind] += 1
            # What was measured on the base's own reference is gone ...
            assert measured["cross"] == kind and "clip_i" not in measured and "background_similarity" not in measured
            if measured["entity"] != "e0":
                assert "face_cosine" not in measured
                continue
            # ... but faces.npy holds the face of the new reference and the clip's: its identity is measured again,
            # the partner's face (another clip) against every face of the subject in the base clip.
            table = tables[base]
            if kind == "same_identity":
                face = tables[ref["cross"]["from_key"]][1]
                expected = float(np.mean(table[[1, 2]] @ face))
            else:  # a composite pastes the base's own subject: its face, against the clip's other keyframe
                expected = float(table[1] @ table[2])
            assert measured["face_cosine"] == pytest.approx(expected, abs=1e-4)
            assert measured["face_copy_paste"] == (measured["face_cosine"] > 0.98)
        cosines = [r["face_cosine"] for r in metrics["references"] if r.get("face_cosine") is not None]
        assert metrics["summary"].get("face_cosine_mean") == (pytest.approx(np.mean(cosines), abs=1e-4)
                                                              if cosines else None)
        kept = [r["background_similarity"] for r in metrics["references"] if "background_similarity" in r]
        assert metrics["summary"].get("background_similarity_mean") == (0.9 if kept else None)
        assert metrics["flags"] == sorted({k for r in metrics["references"] for k, v in r.items() if v is True})
    assert seen["same_identity"] > 0 and seen["composite"] > 0


def test_the_views_of_one_subject_draw_different_references_of_that_identity():
    """A's subject has two views; B and C (other sources) each hold one reference of the same face: in A's cross
    sample the two views come from two different references, not the same one twice."""
    from pipeline.core.config import CrossPairsConfig
    from pipeline.postpass.cross_pairs import OwnSample, plan_cross_pairs

    face = np.zeros(128, np.float32)
    face[0] = 1.0

    def sample(key, source, views):
        refs = [{"file": f"ref{v}.png", "mask": f"mask{v}.png", "entity": "e0", "detection": f"d{v}", "view_id": v}
                for v in range(views)]
        faces = [{"detection": f"d{v}"} for v in range(views)]
        return OwnSample(key, "shards/train-000000.tar", f"clip-{key}", source, {"json": (0, 0), "bg.png": (0, 0)},
                         refs, faces)

    samples = [sample("a", "s1", 2), sample("b", "s2", 1), sample("c", "s3", 1)]
    embeddings = {s.key: np.stack([face] * len(s.references)) for s in samples}
    for seed in range(20):
        cfg = CrossPairsConfig(share=0.75, seed=seed, min_face_similarity=0.5)
        plans, _ = plan_cross_pairs(samples, embeddings, cfg)
        for plan in plans:
            if plan.base == 0:
                partners = [r.partner for r in plan.replacements if r.kind == "same_identity"]
                assert len(partners) == 2 and partners[0] != partners[1], partners


# ---------------------------------------------------------------------------------------------------------------
# Shards and samples from elsewhere (issue 20): skipped with a warning naming them, never the pass


def commit_tampered(out, sources, tamper=None):
    """Sources committed in one shard, as `commit_sources` does, after `tamper(source, samples)` changed them."""
    ledger = Ledger(out)
    sink = ShardSink(out, OutputConfig(shard_max_samples=64), ledger, ledger.recover())
    for source in sources:
        entry, samples = source_entry_and_samples(source)
        if tamper is not None:
            tamper(source, samples)
        sink.add_source(entry, samples)
    sink.close()


def pass_with_warnings(out, cfg=None):
    """The cross pass with a console that records its warnings: (result, text printed)."""
    from rich.console import Console

    text = io.StringIO()
    ledger = Ledger(out)
    result = build_cross_pairs(out, cfg or config(), ledger, ledger.read(), Console(file=text, width=400))
    return result, text.getvalue()


def _object_array() -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def _with_meta(sample, change):
    meta = json.loads(sample["json"])
    change(meta)
    sample["json"] = sample_json(meta)


BAD_SAMPLES = {  # source -> (what is done to its clip-0 sample, what the warning says)
    0: (lambda s: s.update({"faces.npy": _object_array()}), "Python objects"),
    1: (lambda s: s.update({"faces.npy": npy_bytes(np.ones((2, DIM), np.int64))}), "not a 2-D table of floats"),
    2: (lambda s: s.update({"faces.npy": npy_bytes(np.ones(2 * DIM, np.float32))}), "not a 2-D table of floats"),
    3: (lambda s: s.update({"faces.npy": npy_bytes(np.ones((3, DIM), np.float32))}), "3 rows"),
    4: (lambda s: _with_meta(s, lambda m: m["entities"][0]["references"][0].update(file="../x")), "'../x'"),
    5: (lambda s: _with_meta(s, lambda m: m["entities"][0]["references"][0].update(file=5)), "file"),
    6: (lambda s: s.update({"json": b"[" * 100_000}), "nested deeper"),
}


def test_samples_that_are_not_ours_are_left_out_with_a_warning(tmp_path):
    """A pickled (object), integer, 1-D or misaligned faces.npy, a reference naming `../x` or a number, a KEY.json
    nested 100k deep: each such sample is left out, named with its shard; the pass uses the others."""
    def tamper(source, samples):
        if source in BAD_SAMPLES:
            BAD_SAMPLES[source][0](samples[0])

    commit_tampered(tmp_path, range(12), tamper)
    result, printed = pass_with_warnings(tmp_path)
    bad = {source_entry_and_samples(s)[1][0]["__key__"]: why for s, (_, why) in BAD_SAMPLES.items()}
    for key, why in bad.items():
        line = next((line for line in printed.splitlines() if key in line), "")
        assert "shards/train-000000.tar" in line and why in line, (key, why, printed)
    assert result["own"] == 60 - len(bad) and result["info"]["unreadable"] == len(bad)
    assert Ledger(tmp_path).read().cross["samples"] and not keys_used(tmp_path) & set(bad)


def keys_used(out) -> set[str]:
    """The own keys the current cross samples were made from: bases, plate donors and same-identity partners."""
    used = set()
    for sample in cross_samples(out).values():
        meta = json.loads(sample["json"])
        used.add(meta["cross_pair"]["base"])
        used.add(meta["cross_pair"]["background_from"] or meta["cross_pair"]["base"])
        used.update(r["cross"]["from_key"] for e in meta["entities"] for r in e.get("references") or []
                    if r.get("cross", {}).get("kind") == "same_identity")
    return used


def test_shards_that_cannot_be_read_are_skipped_with_a_warning(tmp_path):
    """A gzip-compressed shard and a shard that is a link to a tar outside the directory: neither is read (the
    linked one's samples never reach a cross sample), each is named; the pass builds from the remaining shard."""
    import gzip

    out = tmp_path / "out"
    for sources in ([0, 1, 2, 3], [4, 5], [6, 7]):
        commit_sources(out, sources)
    shards = out / "shards"
    (shards / "train-000001.tar").write_bytes(gzip.compress((shards / "train-000001.tar").read_bytes()))
    outside = tmp_path / "elsewhere.tar"
    (shards / "train-000002.tar").rename(outside)
    (shards / "train-000002.tar").symlink_to(outside)
    result, printed = pass_with_warnings(out)
    assert "shards/train-000001.tar: cannot be read, its 10 samples are left out" in printed and "gzip" in printed
    assert "shards/train-000002.tar: cannot be read, its 10 samples are left out" in printed
    assert "symbolic link" in printed
    assert result["own"] == 20 and result["info"]["unreadable"] == 20 and result["shards"]
    assert {key[:16] for key in keys_used(out)} <= {f"{s:016x}" for s in range(4)}  # source ids of shard 0


def _png_bomb(width: int = 8_000, height: int = 8_000) -> bytes:
    """A PNG whose header declares width x height 8-bit grey pixels, with almost no data: a decoder that trusts it
    allocates the whole image first."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + \
        chunk(b"IEND", b"")


def test_a_base_whose_pixels_do_not_decode_is_skipped_with_a_warning(tmp_path):
    """Sources 35 and 36 (a new person in every clip: every replacement is a composite of the base's own
    reference). Source 35's references are a PNG bomb (refused from its header) or not a PNG at all: its bases are
    skipped and named; the cross samples of source 36 are written."""
    def tamper(source, samples):
        if source == 35:
            for i, sample in enumerate(samples):
                if "ref0.png" in sample:
                    sample["ref0.png"] = _png_bomb() if i % 2 else b"\x89PNG\r\n\x1a\nnot really"

    commit_tampered(tmp_path, [35, 36], tamper)
    result, printed = pass_with_warnings(tmp_path)
    skipped = result["info"]["skipped"].get("unreadable", 0)
    assert skipped > 0 and printed.count("skipped (HostileData") == skipped
    assert "over the limit" in printed and "not a readable image" in printed
    bases = {json.loads(s["json"])["cross_pair"]["base"][:16] for s in cross_samples(tmp_path).values()}
    assert bases == {f"{36:016x}"} and len(Ledger(tmp_path).read().cross["samples"]) == result["target"] - skipped
