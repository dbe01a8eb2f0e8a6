"""The training loop: LR schedule, EMA, timestep sampling, overfitting, exact resume, every position scheme on real
pipeline shards. Real tiny models (diffusers AutoencoderKLWan, transformers UMT5) built once and loaded by path."""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.testing import synthetic_shards as synthetic
from trainer.config import EmaSection, FlowSection, OptimSection, build_train_config
from trainer.encoders import build_tiny_text_encoder, build_tiny_vae
from trainer.train import EMA, Trainer, checkpoint_dirs, lr_factor, sample_t

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def encoders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("encoders")
    return {"vae": str(build_tiny_vae(root / "vae")), "text": str(build_tiny_text_encoder(root / "text"))}


def make_config(out: Path, shards, encoders: dict, **sections):
    """A tiny CPU run: one thread, no loader workers, the prebuilt tiny encoders."""
    data = {"shards": str(shards), "buckets": [[5, 32, 48], [5, 32, 32], [5, 48, 32]], "batch_size": 2,
            "shuffle_buffer": 4, "num_workers": 0, **sections.pop("data", {})}
    base = {"data": data, "vae": {"path": encoders["vae"]}, "text": {"path": encoders["text"], "max_length": 32},
            "optim": {"lr": 3e-3, "warmup_steps": 2}, "out_dir": str(out), "threads": 1, "log_every": 1}
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return build_train_config(base)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- pieces


def test_lr_warmup_then_cosine_to_min_and_constant():
    cosine = OptimSection(lr=1.0, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(s, cosine, 14) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_factor(4, cosine, 14) == pytest.approx(1.0)  # the first step after warmup is the peak
    assert lr_factor(9, cosine, 14) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 5 / 9)))
    assert lr_factor(13, cosine, 14) == pytest.approx(0.1)  # the last step reaches lr * min_lr_ratio
    decaying = [lr_factor(s, cosine, 14) for s in range(4, 14)]
    assert all(a > b for a, b in itertools.pairwise(decaying))
    constant = OptimSection(warmup_steps=2, schedule="constant")
    assert [lr_factor(s, constant, 10) for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]


def test_ema_averages_after_start_step_and_copies_before():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, EmaSection(decay=0.9, start_step=1))
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model, step=0)  # before start_step: a copy
    assert torch.equal(ema.state_dict()["weight"], torch.ones(2, 3))
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model, step=1)
    assert torch.allclose(ema.state_dict()["weight"], torch.full((2, 3), 0.9 * 1.0 + 0.1 * 3.0))
    ema.update(model, step=2)
    assert torch.allclose(ema.state_dict()["weight"], torch.full((2, 3), 0.9 * 1.2 + 0.1 * 3.0))
    assert torch.all(model.weight == 3.0)  # the live weights are untouched


def test_timesteps_are_logit_normal_and_shift_toward_noise_with_resolution():
    flow = FlowSection(logit_mean=0.0, logit_std=1.0, shift=1.0, shift_base_tokens=256)
    t = sample_t(20000, flow, 1.0, torch.Generator().manual_seed(0))
    assert t.min() > 0 and t.max() < 1
    assert t.median().item() == pytest.approx(0.5, abs=0.02)
    logit = torch.log(t / (1 - t))
    assert logit.std().item() == pytest.approx(1.0, abs=0.03)
    shifted = sample_t(20000, flow, 3.0, torch.Generator().manual_seed(0))
    assert shifted.median().item() == pytest.approx(0.75, abs=0.02)  # 3 * 0.5 / (1 + 2 * 0.5)
    assert flow.shift_for(256) == 1.0 and flow.shift_for(4 * 256) == pytest.approx(2.0)  # SD3: sqrt(tokens ratio)
    assert flow.shift_for(16) == 1.0  # never below 1: small videos are not pushed toward clean samples
    assert FlowSection(shift=3.0).shift_for(10**6) == 3.0  # without base tokens the shift is fixed


# ---------------------------------------------------------------------------------------------- training


def test_tiny_model_overfits_eight_samples(tmp_path, encoders):
    """8 samples in one batch, fed again and again: the flow-matching loss falls by more than half."""
    shards = synthetic.write_synthetic_shards(tmp_path / "shards", 8, max_refs=3, frames=5, size=(32, 32),
                                              samples_per_shard=8)
    cfg = make_config(tmp_path / "run", shards[0], encoders, steps=40, log_every=5, ckpt_every=1000,
                      data={"batch_size": 8, "shuffle_buffer": 0, "clip_offset": "start"})
    trainer = Trainer(cfg, resume=False, log=lambda *_: None)
    batch = trainer.next_batch()
    assert len(batch["key"]) == 8 and batch["ref_valid"].any()
    trainer.batches = itertools.repeat(batch)
    trainer.run()
    losses = [m["loss"] for m in metrics(tmp_path / "run")]
    assert len(losses) == 8
    assert losses[-1] < 0.5 * losses[0], losses


def test_resume_gives_the_same_next_losses_and_weights(tmp_path, encoders):
    """Run 4 steps straight; run 2, stop, resume to 4: steps 3 and 4 have the same loss (data order, t, noise,
    optimizer and EMA state restored), and the final weights and EMA are equal."""
    shards = synthetic.write_synthetic_shards(tmp_path / "shards", 8, max_refs=2, frames=5, samples_per_shard=4)
    straight = make_config(tmp_path / "straight", tmp_path / "shards", encoders, steps=4, ckpt_every=2)
    Trainer(straight, log=lambda *_: None).run()
    split = make_config(tmp_path / "split", tmp_path / "shards", encoders, steps=2, ckpt_every=2)
    Trainer(split, log=lambda *_: None).run()
    resumed = Trainer(split.model_copy(update={"steps": 4}), log=lambda *_: None)
    assert resumed.step == 2
    resumed.run()
    assert len(shards) == 2
    expected = {m["step"]: m["loss"] for m in metrics(tmp_path / "straight")}
    got = {m["step"]: m["loss"] for m in metrics(tmp_path / "split")}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-7), (step, got, expected)
    a, b = checkpoint_dirs(tmp_path / "straight")[-1], checkpoint_dirs(tmp_path / "split")[-1]
    for name in ("model.safetensors", "ema.safetensors"):
        left, right = load_file(a / name), load_file(b / name)
        assert all(torch.allclose(left[k], right[k], atol=1e-6) for k in left)
    state = json.loads((b / "state.json").read_text())
    assert state["step"] == 4 and state["data"][0]["samples_seen"] > 0


@pytest.mark.parametrize("scheme", ["phantom", "kaleido", "ts-rope", "lumosx"])
def test_every_position_scheme_trains_from_pipeline_shards(curated_out, encoders, tmp_path, scheme):
    """Real shards of a pipeline run (references and background plates): each scheme takes 3 steps, the loss is
    finite, the reference tokens reached the model, and a checkpoint holds the scheme."""
    cfg = make_config(tmp_path / scheme, curated_out / "shards", encoders, steps=3, ckpt_every=3,
                      model={"position_scheme": scheme}, data={"shuffle_buffer": 0, "clip_offset": "start"})
    trainer = Trainer(cfg, log=lambda *_: None)
    batch = trainer.next_batch()
    assert batch["ref_valid"].any(), "the pipeline's samples carry references"
    trainer.batches = itertools.chain([batch], trainer.batches)
    last = trainer.run()
    assert math.isfinite(last["loss"]) and last["step"] == 3
    state = json.loads((checkpoint_dirs(tmp_path / scheme)[-1] / "state.json").read_text())
    assert state["model_config"]["position_scheme"] == scheme
    # The references change the prediction: drop them and the (trained) model's output moves.
    inputs = trainer.encode(batch)
    x, t = torch.randn_like(inputs["x0"]), torch.full((inputs["x0"].shape[0],), 0.5)
    with torch.no_grad():
        with_refs = trainer.model(x, t, **{k: inputs[k] for k in ("refs", "ref_valid", "ref_subject", "ref_view",
                                                                  "ref_kind", "ref_group", "text", "text_mask",
                                                                  "subject_tokens")})
        without = trainer.model(x, t, text=inputs["text"], text_mask=inputs["text_mask"])
    assert not torch.allclose(with_refs, without, atol=1e-6)


@pytest.mark.slow
def test_fsdp2_on_two_gloo_processes_resumes_exactly(tmp_path, encoders):
    """torchrun with 2 CPU processes (gloo), FSDP2: sharded weights, EMA and optimizer state are gathered into the
    checkpoint and scattered back on resume; the resumed step 2 equals the uninterrupted one."""
    synthetic.write_synthetic_shards(tmp_path / "shards", 8, max_refs=2, frames=5, samples_per_shard=2)
    repo = Path(__file__).resolve().parents[2]

    def launch(out: Path) -> None:
        args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "trainer.cli", "--config", str(repo / "configs" / "train-tiny.yaml"),
                "--shards", str(tmp_path / "shards"), "--out", str(out)]
        for key, value in {"dist.mode": "fsdp2", "steps": 2, "ckpt_every": 1, "log_every": 1,
                           "data.num_workers": 0, "data.buckets": "[[5,32,48],[5,32,32],[5,48,32]]",
                           "vae.path": encoders["vae"], "text.path": encoders["text"], "text.max_length": 32}.items():
            args += ["--set", f"{key}={value}"]
        done = subprocess.run(args, check=False, cwd=repo, capture_output=True, text=True, timeout=240,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    launch(tmp_path / "straight")
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-0000002")
    (tmp_path / "resumed" / "metrics.jsonl").unlink()
    launch(tmp_path / "resumed")
    expected, got = metrics(tmp_path / "straight")[1], metrics(tmp_path / "resumed")
    assert [m["step"] for m in got] == [2]
    assert got[0]["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    for name in ("model.safetensors", "ema.safetensors"):
        left = load_file(tmp_path / "straight" / "checkpoints" / "step-0000002" / name)
        right = load_file(tmp_path / "resumed" / "checkpoints" / "step-0000002" / name)
        assert left.keys() == right.keys() and all(torch.allclose(left[k], right[k], atol=1e-6) for k in left)


def test_weight_decay_spares_biases_norms_and_modulation_tables():
    """The 1b model's adaLN `modulation` tables are [1, 1, 6, dim]: a dimension test alone decayed them."""
    from trainer.config import load_train_config
    from trainer.model import DiT
    from trainer.train import build_model_config, decay_groups

    cfg = load_train_config(Path(__file__).resolve().parents[2] / "configs" / "train-tiny.yaml")
    model = DiT(build_model_config(cfg, 16, 32))
    decayed, spared = decay_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[id(p)] for p in decayed["params"]}
    spared_names = {names[id(p)] for p in spared["params"]}
    assert (decayed["weight_decay"], spared["weight_decay"]) == (0.1, 0.0)
    assert "head_modulation" in spared_names and "blocks.0.modulation" in spared_names
    assert {"blocks.0.self_attn.norm_q.weight", "blocks.0.norm2.weight", "head.bias"} <= spared_names
    assert {"blocks.0.self_attn.qkv.weight", "blocks.0.ffn.0.weight", "head.weight",
            "patch_embed.weight"} <= decayed_names
    assert not any("modulation" in n or ".norm" in n or n.endswith("bias") for n in decayed_names)
    assert len(decayed_names) + len(spared_names) == len(names)


def test_a_non_finite_loss_skips_the_step_and_is_counted(tmp_path, encoders):
    """A batch that makes the loss NaN leaves weights, optimizer moments and EMA untouched; the log counts it."""
    from trainer.train import Window

    synthetic.write_synthetic_shards(tmp_path / "shards", 4, max_refs=1, frames=5, samples_per_shard=4)
    cfg = make_config(tmp_path / "run", tmp_path / "shards", encoders, steps=2, ckpt_every=1000,
                      data={"batch_size": 2, "shuffle_buffer": 0, "clip_offset": "start"})
    trainer = Trainer(cfg, resume=False, log=lambda *_: None)
    good = trainer.next_batch()
    bad = {**good, "video": torch.full_like(good["video"], float("nan"))}
    trainer.batches = iter([bad, good])
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    ema_before = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    window = Window()
    trainer.train_step(window)
    assert window.skipped == 1 and trainer.step == 1
    assert all(torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    assert all(torch.equal(v, ema_before[k]) for k, v in trainer.ema.state_dict().items())
    assert not trainer.opt.state  # no moments from a NaN gradient
    trainer.train_step(window)
    assert window.skipped == 1 and any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters())
    logged = trainer.log_window(window)
    assert logged["skipped_steps"] == 1 and math.isfinite(logged["loss"])
