"""`s2v train` and `s2v sample` through click's CliRunner: a real run on pipeline shards, a playable preview, and
clear errors (exit 2, no traceback) for what a user gets wrong."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
from click.testing import CliRunner

from trainer.cli import sample, train

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "train-tiny.yaml")
FAST = ["--set", "steps=2", "--set", "ckpt_every=2", "--set", "log_every=1", "--set", "data.num_workers=0",
        "--set", "data.clip_offset=start"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def trained(curated_out, tmp_path_factory) -> Path:
    """`s2v train --config configs/train-tiny.yaml --shards OUT/shards` for 2 steps (tiny random encoders)."""
    out = tmp_path_factory.mktemp("train") / "run"
    result = CliRunner().invoke(train, ["--config", CONFIG, "--shards", str(curated_out / "shards"),
                                        "--out", str(out), *FAST])
    assert result.exit_code == 0, result.output
    assert "tiny RANDOM model" in result.output  # the log says the encoders are not for real training
    return out


def test_train_writes_checkpoint_metrics_and_config(trained):
    step = trained / "checkpoints" / "step-0000002"
    assert {p.name for p in step.iterdir()} == {"model.safetensors", "ema.safetensors", "optimizer.pt",
                                                 "state.json"}
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["loss"] > 0 and m["samples_per_s"] > 0 and 0 <= m["data_wait_frac"] <= 1
        assert m["mfu"] is None  # CPU: no peak to divide by
        assert [k for k in m if k.startswith("loss_t")] == ["loss_t0.00-0.25", "loss_t0.25-0.50",
                                                             "loss_t0.50-0.75", "loss_t0.75-1.00"]
    assert "position_scheme: kaleido" in (trained / "config.yaml").read_text()


def test_train_again_resumes_and_stops_at_steps(trained, curated_out):
    result = CliRunner().invoke(train, ["--config", CONFIG, "--shards", str(curated_out / "shards"),
                                        "--out", str(trained), *FAST, "--set", "steps=3", "--set", "ckpt_every=3"])
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output and "step-0000002" in result.output
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]


def test_sample_writes_a_playable_preview(trained, curated_out, tmp_path):
    out = tmp_path / "preview.mp4"
    result = CliRunner().invoke(sample, ["--checkpoint", str(trained), "--shards", str(curated_out / "shards"),
                                         "--out", str(out), "--steps", "3"])
    assert result.exit_code == 0, result.output
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) == 9  # the bucket's frame count (the VAE decodes 3 latent frames to 1 + 2 * 4)
    assert frames[0].shape[0] in (48, 80) and frames[0].shape[1] in (48, 80)


def test_sample_unknown_key_is_a_clear_error(trained, curated_out, tmp_path):
    result = CliRunner().invoke(sample, ["--checkpoint", str(trained), "--shards", str(curated_out / "shards"),
                                         "--key", "no-such-key", "--out", str(tmp_path / "p.mp4")])
    assert result.exit_code == 2 and "no sample 'no-such-key'" in result.output


@pytest.mark.parametrize("name", ["train-tiny.yaml", "train-1b.yaml"])
def test_shipped_configs_validate(name):
    from trainer.config import load_train_config
    from trainer.model import param_count
    from trainer.train import build_model_config

    cfg = load_train_config(Path(CONFIG).parent / name)
    model = build_model_config(cfg, latent_channels=16, text_dim=4096)  # Wan2.1 VAE, UMT5-XXL
    size = param_count(model)
    assert (size < 5e6) if name == "train-tiny.yaml" else (0.9e9 < size < 1.5e9)


@pytest.mark.parametrize("case", ["missing_dir", "no_tars", "missing_model", "bad_key"])
def test_train_user_errors_exit_2_with_the_fix(case, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "train-000000.tar").write_bytes(b"")
    args = ["--config", CONFIG, "--shards", str(shards), "--out", str(tmp_path / "run")]
    expected = {
        "missing_dir": "no such directory",
        "no_tars": "no *.tar shards",
        "missing_model": "is not available on this machine",
        "bad_key": "unknown config key 'optim.learning_rate'",
    }[case]
    if case == "missing_dir":
        args[3] = str(tmp_path / "nowhere")
    elif case == "no_tars":
        (shards / "train-000000.tar").unlink()
    elif case == "missing_model":
        args += ["--set", f"vae.path={tmp_path / 'no-vae'}"]
    else:
        args += ["--set", "optim.learning_rate=1"]
    result = CliRunner().invoke(train, args)
    assert result.exit_code == 2, result.output
    assert expected in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "run" / "checkpoints").exists()


def _hostile_variants(meta: dict) -> dict[str, bytes]:
    """KEY.json variants that each killed a training run before (issue 20), by name."""
    import copy

    def variant(change) -> bytes:
        bad = copy.deepcopy(meta)
        change(bad)
        return json.dumps(bad).encode()

    first = next(e for e in meta["entities"] if e.get("references"))
    index = meta["entities"].index(first)
    return {
        "negative-subject": variant(lambda m: m["entities"][index].update(subject_id=-1)),
        "huge-subject": variant(lambda m: m["entities"][index].update(subject_id=1e30)),
        "alloc-subject": variant(lambda m: m["entities"][index].update(subject_id=300000000)),
        "huge-view": variant(lambda m: m["entities"][index]["references"][0].update(view_id=1e30)),
        "fraction-height": variant(lambda m: m["clip"].update(height=0.5)),
        "deep-nesting": b'{"key": "x", "deep": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    }


def test_train_finishes_over_shards_seeded_with_hostile_samples(curated_out, tmp_path, caplog):
    """Every hostile KEY.json is skipped with a warning naming it; the good samples train."""
    import logging

    from pipeline.store.shards import iter_samples, write_shard

    shard = sorted((curated_out / "shards").glob("train-*.tar"))[0]
    good = list(iter_samples(str(shard)))
    base = good[0]
    hostile = []
    for name, data in _hostile_variants(json.loads(base["json"])).items():
        sample = {k: v for k, v in base.items() if not k.startswith("__")}
        hostile.append({**sample, "__key__": f"{name}-0000000-0000001", "json": data})
    shards = tmp_path / "shards"
    write_shard(str(tmp_path), "shards/train-000000.tar",
                [*hostile, *({k: v for k, v in s.items() if k != "__url__"} for s in good)])
    out = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        result = CliRunner().invoke(train, ["--config", CONFIG, "--shards", str(shards), "--out", str(out), *FAST,
                                            "--set", "data.shuffle_buffer=0"])
    assert result.exit_code == 0, result.output
    assert (out / "checkpoints" / "step-0000002").is_dir()
    for sample in hostile:
        assert f"skipping sample {sample['__key__']}" in caplog.text
