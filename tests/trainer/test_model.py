"""The Wan-style DiT: shapes, reference handling, padding, LumosX masks in the model, RoPE, gradients, overfitting."""

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from trainer.model import (
    MODEL_SIZES,
    DiT,
    RotaryEmbedding,
    SelfAttention,
    apply_rope,
    dit_config,
    flops_per_step,
    forward_flops,
    param_count,
    rope_axis_dims,
    token_counts,
)
from trainer.positions import SCHEMES

C, TEXT_DIM, L = 16, 32, 6


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


def make_model(scheme: str, seed: int = 0, **overrides) -> DiT:
    torch.manual_seed(seed)
    model = DiT(dit_config("tiny", position_scheme=scheme, in_channels=C, text_dim=TEXT_DIM, **overrides)).eval()
    # The head is zero at init (Wan), which would make every output 0 and every comparison below vacuous.
    nn.init.normal_(model.head.weight, std=0.1)
    return model


def make_batch(seed: int = 0, frames: int = 2) -> dict:
    """Two samples, K = 2 slots: sample 0 has a face and an attribute of subject 0 (group 0); sample 1 has one
    reference of subject 0 and a padding slot whose content and ids are junk (they must be ignored)."""
    g = torch.Generator().manual_seed(seed)
    words = torch.zeros(2, 2, L, dtype=torch.bool)
    words[:, 0, 1] = True
    words[:, 1, 3] = True
    text_mask = torch.ones(2, L, dtype=torch.bool)
    text_mask[1, 4:] = False
    return {
        "x": torch.randn(2, C, frames, 8, 8, generator=g),
        "t": torch.tensor([0.3, 0.8]),
        "refs": torch.randn(2, 2, C, 1, 4, 4, generator=g),
        "ref_valid": torch.tensor([[True, True], [True, False]]),
        "ref_subject": torch.tensor([[0, 0], [0, 1]]),
        "ref_view": torch.tensor([[0, 1], [0, 0]]),
        "ref_kind": torch.tensor([[0, 0], [0, 0]]),
        "ref_group": torch.tensor([[0, 0], [0, 1]]),
        "text": torch.randn(2, L, TEXT_DIM, generator=g),
        "text_mask": text_mask,
        "subject_tokens": words,
    }


def select(batch: dict, rows, slots) -> dict:
    """Samples `rows` with reference slots `slots` (a slot index of -1: a fresh padding slot with junk)."""
    out = {k: v[rows] for k, v in batch.items()}

    def pick(v, pad):
        return torch.stack([v[:, s] if s >= 0 else pad for s in slots], 1)

    out["refs"] = pick(out["refs"], torch.randn_like(out["refs"][:, 0]) * 5)
    out["ref_valid"] = pick(out["ref_valid"], torch.zeros_like(out["ref_valid"][:, 0]))
    for key in ("ref_subject", "ref_view", "ref_kind", "ref_group"):
        out[key] = pick(out[key], torch.zeros_like(out[key][:, 0]))  # junk ids that collide with real ones
    return out


@pytest.mark.parametrize("scheme", SCHEMES)
def test_output_is_the_video_only(scheme):
    model, batch = make_model(scheme), make_batch()
    with torch.no_grad():
        assert model(**batch).shape == batch["x"].shape
        no_refs = {k: v for k, v in batch.items() if not k.startswith("ref")}
        assert model(**no_refs).shape == batch["x"].shape


def test_temporal_patch_repeats_the_reference_frame():
    model, batch = make_model("kaleido", patch=(2, 2, 2)), make_batch(frames=4)
    with torch.no_grad():
        assert model(**batch).shape == (2, C, 4, 8, 8)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_padding_references_do_not_change_the_output(scheme):
    model, batch = make_model(scheme), make_batch()
    with torch.no_grad():
        out = model(**batch)
        # An extra padding slot with junk content and junk ids.
        assert (model(**select(batch, [0, 1], [0, 1, -1])) - out).abs().max() < 1e-5
        # Sample 1 alone with no padding, and with its padding slot before its real reference.
        alone = model(**select(batch, [1], [0]))
        assert (alone - out[1:]).abs().max() < 1e-5
        assert (model(**select(batch, [1], [-1, 0])) - alone).abs().max() < 1e-5
        # The padding is what it claims to be: a real reference there would change sample 1.
        batch["ref_valid"][1, 1] = True
        assert (model(**batch)[1] - out[1]).abs().max() > 1e-3


@pytest.mark.parametrize("scheme", SCHEMES)
def test_a_valid_reference_influences_its_sample_only(scheme):
    model, batch = make_model(scheme), make_batch()
    with torch.no_grad():
        out = model(**batch)
        batch["refs"][0, 1] += 1.0
        changed = model(**batch)
    assert (changed[0] - out[0]).abs().max() > 1e-3
    assert (changed[1] - out[1]).abs().max() < 1e-6


def last_block_tokens(model: DiT, batch: dict) -> torch.Tensor:
    seen = []
    handle = model.blocks[-1].register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        model(**batch)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("scheme", ["lumosx", "phantom"])
@pytest.mark.parametrize("change", ["video", "timestep"])
def test_lumosx_conditions_never_attend_to_the_video(scheme, change):
    model, batch = make_model(scheme), make_batch()
    before = last_block_tokens(model, batch)
    if change == "video":
        batch["x"] = batch["x"] + 1.0
    else:
        batch["t"] = 1 - batch["t"]
    after = last_block_tokens(model, batch)
    n_video = 2 * 4 * 4
    ref_change = (after[:, n_video:] - before[:, n_video:]).abs().max()
    # LumosX: reference tokens see only their branch and are modulated with t = 0, so neither the video nor its
    # timestep reaches them; other schemes mix them with the video freely.
    assert (ref_change < 1e-6) if scheme == "lumosx" else (ref_change > 1e-3)
    assert (after[:, :n_video] - before[:, :n_video]).abs().max() > 1e-3


def test_the_model_uses_the_schemes_position_ids():
    batch = make_batch()
    with torch.no_grad():
        phantom = make_model("phantom")(**batch)
        # TS-RoPE with delta 1 lays references out exactly as Phantom: same ids, same weights, same output.
        assert (make_model("ts-rope", ts_delta=1)(**batch) - phantom).abs().max() < 1e-6
        for scheme in ("kaleido", "ts-rope"):
            assert (make_model(scheme)(**batch) - phantom).abs().max() > 1e-4, scheme


def test_lumosx_cross_attention_bias_is_applied_with_its_strength():
    batch = make_batch()
    moved = dict(batch, subject_tokens=batch["subject_tokens"].roll(1, dims=-1))
    with torch.no_grad():
        lumosx = make_model("lumosx")
        assert (lumosx(**moved) - lumosx(**batch)).abs().max() > 1e-4
        off = make_model("lumosx", lumosx_bias_strength=0.0)
        assert (off(**moved) - off(**batch)).abs().max() < 1e-6
        phantom = make_model("phantom")
        assert (phantom(**moved) - phantom(**batch)).abs().max() < 1e-6


def test_rope_splits_heads_like_wan():
    assert rope_axis_dims(128) == (44, 42, 42)
    assert rope_axis_dims(16) == (8, 4, 4)


def test_rope_scores_depend_only_on_relative_positions():
    torch.manual_seed(0)
    rope = RotaryEmbedding(head_dim=16, theta=10000.0)
    q, k = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    ids = torch.randint(0, 8, (1, 10, 3))

    def scores(ids):
        cos, sin = rope(ids)
        return apply_rope(q, cos, sin) @ apply_rope(k, cos, sin).transpose(-1, -2)

    assert torch.allclose(scores(ids), scores(ids + torch.tensor([3, 5, 7])), atol=1e-4)
    moved = ids.clone()
    moved[0, 0] += torch.tensor([0, 0, 1])  # one token moves along w only: its scores must change
    assert (scores(moved) - scores(ids))[..., 0, 1:].abs().max() > 1e-3

    attention = SelfAttention(dit_config("tiny"))
    x = torch.randn(1, 10, 64)
    with torch.no_grad():
        assert torch.allclose(attention(x, rope(ids), None), attention(x, rope(ids + 11), None), atol=1e-5)


@pytest.mark.parametrize("scheme", ["kaleido", "lumosx"])
def test_gradient_reaches_every_parameter(scheme):
    model, batch = make_model(scheme).train(), make_batch()
    nn.init.zeros_(model.head.weight)  # Wan's init: only the head learns on the first step, the rest after it
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        (model(**batch) - batch["x"]).square().mean().backward()
        optimizer.step()
    silent = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = make_batch()
    grads = []
    for flag in (False, True):
        model = make_model("ts-rope", grad_checkpointing=flag).train()
        (model(**batch) - batch["x"]).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = DiT(dit_config("tiny", position_scheme="lumosx", in_channels=C, text_dim=TEXT_DIM)).train()
    batch = make_batch()
    x0 = batch.pop("x")
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    t = batch.pop("t")
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
    target = eps - x0
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(40):  # the loss halves in about 12 steps at this rate; 40 leave a wide margin
        loss = (model(x_t, t, **batch) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] <= 0.5 * losses[0], losses[::10]


def test_registry_sizes_on_the_meta_device():
    assert 0.8e9 <= param_count(MODEL_SIZES["1b"]) <= 1.3e9
    assert 1.2e9 <= param_count(MODEL_SIZES["wan-1.3b"]) <= 1.5e9
    wan = MODEL_SIZES["wan-1.3b"]
    assert (wan.dim, wan.depth, wan.heads, wan.ffn_dim, wan.text_dim, wan.head_dim) == (1536, 30, 12, 8960, 4096, 128)
    assert param_count(MODEL_SIZES["tiny"]) == sum(p.numel() for p in make_model("phantom").parameters())


def test_flops_formula_matches_torch_flop_counter():
    model, batch = make_model("lumosx"), make_batch()
    video_tokens, ref_tokens = token_counts(model.cfg, (2, 8, 8), (4, 4), num_refs=2)
    assert (video_tokens, ref_tokens) == (32, 8)
    # The math backend runs attention as plain matmuls, which the counter sees.
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**batch)
    assert counter.get_total_flops() == 2 * forward_flops(model.cfg, video_tokens, ref_tokens, L)
    assert flops_per_step(model.cfg, 2, video_tokens, ref_tokens, L) == 3 * counter.get_total_flops()


def test_config_errors_name_the_key_and_the_allowed_values():
    with pytest.raises(ValueError, match="position_scheme must be one of"):
        dit_config("tiny", position_scheme="rope")
    with pytest.raises(ValueError, match="model size must be one of"):
        dit_config("7b")
    with pytest.raises(ValueError, match="unknown DiTConfig fields"):
        dit_config("tiny", width=3)
    with pytest.raises(ValueError, match="divisible"):
        dit_config("tiny", heads=5)
