"""A Wan-style DiT for subject-to-video: clean reference latents ride in the token sequence next to the noisy video.

Block (Wan2.1): adaLN modulation from the timestep (6-way: shift/scale/gate for self-attention and for the FFN, a
learned table added to the projected time embedding), self-attention with RMSNorm on q and k and 3D RoPE from
explicit per-token (t, h, w) ids, text cross-attention (LayerNorm with affine before it, no modulation), GELU-tanh
FFN. The head modulates and unpatchifies the video tokens only.

References: every reference latent [C, 1, hr, wr] goes through the same patch embedding as the video and its tokens
follow the video tokens (positions.py: token order and the four position schemes). References are clean (Phantom,
Kaleido, LumosX all feed them un-noised), so their tokens are modulated with the t = 0 embedding, as Wan2.2-TI2V
modulates its clean conditioning frame with a per-token timestep of 0; they are dropped before the head, so they
never enter the output or the loss. Padding slots (ref_valid False) keep their place in the [B, K] layout but are
masked out of every query's keys, so they cannot change a real token; their own (unused) outputs attend to the real
keys only (LumosX: to themselves).

LumosX adds its masks: the self-attention mask (conditions attend within their branch only, never to the video) and
the multilevel cross-attention bias, added to the text-attention logits times ``lumosx_bias_strength``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.positions import SCHEMES, PositionConfig, lumosx_masks, position_ids


@dataclass(frozen=True)
class DiTConfig:
    """Model shape and reference handling. Defaults are the CPU-fast "tiny" model."""

    dim: int = 64
    depth: int = 2
    heads: int = 4
    ffn_dim: int = 128
    in_channels: int = 16  # VAE latent channels (Wan2.1 VAE: 16); the output has the same
    text_dim: int = 32  # text encoder width (UMT5-XXL: 4096)
    patch: tuple[int, int, int] = (1, 2, 2)  # (t, h, w); a 1-frame reference is repeated to patch[0] frames
    freq_dim: int = 256  # sinusoidal timestep features
    rope_theta: float = 10000.0
    eps: float = 1e-6
    position_scheme: str = "kaleido"
    ts_delta: int = 4  # ts-rope's temporal shift (positions.py)
    lumosx_bias_strength: float = 1.0  # multiplies LumosX's {+1, -1, 0} text-attention bias
    grad_checkpointing: bool = False  # recompute each block in backward: activation memory for ~1/3 more compute

    def __post_init__(self):
        object.__setattr__(self, "patch", tuple(int(p) for p in self.patch))
        if self.position_scheme not in SCHEMES:
            raise ValueError(f"position_scheme must be one of {SCHEMES}, got {self.position_scheme!r}")
        if self.dim % self.heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by heads ({self.heads})")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"dim / heads = {self.head_dim} must be even and >= 6 (RoPE splits it over t/h/w)")
        if len(self.patch) != 3 or min(self.patch) < 1:
            raise ValueError(f"patch must be three positive ints (t, h, w), got {self.patch}")
        PositionConfig(ts_delta=self.ts_delta)  # validates

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads

    @property
    def positions(self) -> PositionConfig:
        return PositionConfig(ts_delta=self.ts_delta)


MODEL_SIZES: dict[str, DiTConfig] = {
    "tiny": DiTConfig(),
    "1b": DiTConfig(dim=2048, depth=16, heads=16, ffn_dim=8192, text_dim=4096),
    "wan-1.3b": DiTConfig(dim=1536, depth=30, heads=12, ffn_dim=8960, text_dim=4096),
}


def dit_config(size: str, **overrides) -> DiTConfig:
    """A registry size with some fields replaced, e.g. dit_config("tiny", text_dim=encoder.dim)."""
    if size not in MODEL_SIZES:
        raise ValueError(f"model size must be one of {sorted(MODEL_SIZES)}, got {size!r}")
    known = {f.name for f in fields(DiTConfig)}
    if unknown := sorted(set(overrides) - known):
        raise ValueError(f"unknown DiTConfig fields {unknown}; allowed: {sorted(known)}")
    return replace(MODEL_SIZES[size], **overrides)


# ---- RoPE from explicit ids --------------------------------------------------------------------------------------


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Wan's split of a head over (t, h, w): 44/42/42 of 128, the same formula for other head sizes."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


class RotaryEmbedding(nn.Module):
    """cos/sin [B, 1, N, head_dim/2] for position ids [B, N, 3]; pairs (0,1), (2,3), ... rotate as in Wan.

    No buffers: the few frequencies are rebuilt per call, so a model made on the meta device (FSDP2) needs no fix-up.
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs, axis = [], []
        for a, d in enumerate(rope_axis_dims(self.head_dim)):
            freqs.append(self.theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=ids.device) / d))
            axis.append(torch.full((d // 2,), a, device=ids.device))
        angles = ids[..., torch.cat(axis)].float() * torch.cat(freqs).float()
        return angles.cos().unsqueeze(1), angles.sin().unsqueeze(1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, heads, N, head_dim] pairwise by the angles behind cos/sin; float32 out."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).flatten(-2)


# ---- blocks -------------------------------------------------------------------------------------------------------


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, n_video: int) -> torch.Tensor:
    """adaLN per segment: shift/scale [B, 2, D] hold the video's (noisy t) and the references' (t = 0) values."""
    video = x[:, :n_video] * (1 + scale[:, :1]) + shift[:, :1]
    if n_video == x.shape[1]:
        return video
    # Two slices and a cat, not a per-token [B, N, D] gather: autograd then saves views, not a token-sized copy.
    return torch.cat([video, x[:, n_video:] * (1 + scale[:, 1:]) + shift[:, 1:]], 1)


def gated(x: torch.Tensor, gate: torch.Tensor, n_video: int) -> torch.Tensor:
    if n_video == x.shape[1]:
        return x * gate[:, :1]
    return torch.cat([x[:, :n_video] * gate[:, :1], x[:, n_video:] * gate[:, 1:]], 1)


class RMSNorm(nn.RMSNorm):
    """RMSNorm in float32 whatever the input and weight dtypes (bf16 statistics over a wide dim drift); float32 out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x.float(), self.normalized_shape, self.weight.float(), self.eps)


class SelfAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, eps=cfg.eps)  # across heads, as Wan
        self.norm_k = RMSNorm(cfg.dim, eps=cfg.eps)
        self.out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, rope, mask):
        B, N, D = x.shape
        q, k, v = self.qkv(x).chunk(3, -1)
        q, k, v = (y.view(B, N, self.heads, -1).transpose(1, 2) for y in (self.norm_q(q), self.norm_k(k), v))
        q, k = apply_rope(q, *rope).to(v.dtype), apply_rope(k, *rope).to(v.dtype)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, N, D))


class CrossAttention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, eps=cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, eps=cfg.eps)
        self.out = nn.Linear(cfg.dim, cfg.dim)

    def forward(self, x, text, mask):
        B, N, D = x.shape
        k, v = self.kv(text).chunk(2, -1)
        q = self.norm_q(self.q(x)).to(v.dtype).view(B, N, self.heads, -1).transpose(1, 2)
        k = self.norm_k(k).to(v.dtype).view(B, -1, self.heads, D // self.heads).transpose(1, 2)
        v = v.reshape(B, -1, self.heads, D // self.heads).transpose(1, 2)
        if mask is not None and mask.is_floating_point():
            mask = mask.to(q.dtype)  # SDPA wants a float mask in the query's dtype (bf16 under autocast)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps)
        self.cross_attn = CrossAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.GELU("tanh"), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, e, n_video, rope, self_mask, text, cross_mask):
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation + e).unbind(2)  # each [B, 2, D]
        x = x + gated(self.self_attn(modulate(self.norm1(x), shift1, scale1, n_video), rope, self_mask), gate1, n_video)
        x = x + self.cross_attn(self.norm2(x), text, cross_mask)
        return x + gated(self.ffn(modulate(self.norm3(x), shift2, scale2, n_video)), gate2, n_video)


def timestep_features(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1], scaled to Wan's 0..1000 timestep range (cos first, as Wan)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = 1000.0 * t.float()[:, None] * freqs
    return torch.cat([angles.cos(), angles.sin()], -1)


# ---- the model ----------------------------------------------------------------------------------------------------


@lru_cache(maxsize=4096)
def _sample_ids(scheme, ts_delta, video_grid, ref_grid, subject, view, kind, group):
    """Position ids of one sample's real references; batches repeat the same layouts, hence the cache."""
    n = len(subject)
    return position_ids(scheme, video_grid, [ref_grid] * n, subject, view, kind, group, PositionConfig(ts_delta))


class DiT(nn.Module):
    """forward(x [B,C,f,h,w] noisy latents, t [B] in [0, 1], refs [B,K,C,1,hr,wr] clean latents, ...) -> v [B,C,f,h,w].

    The prediction covers the video tokens only. ref_* are [B, K] (ref_valid bool; subject/view/kind/group long,
    -1 for padding), text [B, L, text_dim], text_mask [B, L] bool, subject_tokens [B, S, L] bool (LumosX only).
    The ref_* ids and subject_tokens are read on the host to lay out positions and masks: keeping them on the CPU
    spares a device sync per step.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embed = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch, stride=cfg.patch)
        self.time_embed = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.text_embed = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU("tanh"), nn.Linear(d, d))
        self.rope = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.head_modulation = nn.Parameter(torch.randn(1, 2, d) / d**0.5)
        self.head = nn.Linear(d, cfg.in_channels * math.prod(cfg.patch))
        self._init_weights()

    def _init_weights(self):
        # Wan's init: xavier linears with zero bias, N(0, 0.02) embedders, a zero head (the first prediction is 0).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embed.weight.flatten(1))
        for m in (*self.time_embed, *self.text_embed):
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.weight)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        refs: torch.Tensor | None = None,
        ref_valid: torch.Tensor | None = None,
        ref_subject: torch.Tensor | None = None,
        ref_view: torch.Tensor | None = None,
        ref_kind: torch.Tensor | None = None,
        ref_group: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        subject_tokens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        B = x.shape[0]
        video = self.patch_embed(x)
        grid = tuple(video.shape[2:])
        tokens = video.flatten(2).transpose(1, 2)
        n_video = tokens.shape[1]
        K = 0 if refs is None else refs.shape[1]
        ref_grid = (0, 0)
        if K:
            r = refs.flatten(0, 1).expand(-1, -1, cfg.patch[0], -1, -1)  # one frame, repeated to the t patch
            r = self.patch_embed(r)
            ref_grid = tuple(r.shape[3:])
            tokens = torch.cat([tokens, r.flatten(2).transpose(1, 2).reshape(B, -1, cfg.dim)], 1)
        if text is None:
            raise ValueError("text embeddings are required (an empty caption still encodes to an EOS token)")
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        # A row with no valid text token would make softmax NaN; let it see every token instead.
        text_mask = text_mask.bool() | ~text_mask.bool().any(-1, keepdim=True)

        meta = self._ref_meta(B, K, ref_valid, ref_subject, ref_view, ref_kind, ref_group)
        ids, self_mask, cross_mask = self._layout(grid, ref_grid, K, meta, text_mask, subject_tokens)
        rope = self.rope(ids.to(x.device))

        temb = self.time_embed(timestep_features(torch.cat([t.reshape(B), t.new_zeros(B)]), cfg.freq_dim))
        e = self.time_proj(temb).view(2, B, 6, cfg.dim).transpose(0, 1)  # [B, 2 (video, refs), 6, D]
        text = self.text_embed(text)

        for block in self.blocks:
            args = (tokens, e, n_video, rope, self_mask, text, cross_mask)
            if cfg.grad_checkpointing and self.training:
                tokens = checkpoint(block, *args, use_reentrant=False)
            else:
                tokens = block(*args)

        shift, scale = (self.head_modulation + temb[:B, None]).unbind(1)
        out = self.head(self.norm_out(tokens[:, :n_video]) * (1 + scale[:, None]) + shift[:, None])
        return self._unpatchify(out, grid)

    def _unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        (f, h, w), (pt, ph, pw), C = grid, self.cfg.patch, self.cfg.in_channels
        out = out.view(out.shape[0], f, h, w, pt, ph, pw, C)
        return out.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(out.shape[0], C, f * pt, h * ph, w * pw)

    @staticmethod
    def _ref_meta(B, K, ref_valid, *fields_):
        """Per sample: (slot indices of the real references, their subject, view, kind, group) as Python tuples."""
        if K == 0:
            return [((), (), (), (), ())] * B
        valid = torch.ones(B, K, dtype=torch.bool) if ref_valid is None else ref_valid.bool().cpu()
        cols = [torch.full((B, K), -1) if f is None else f.long().cpu() for f in fields_]
        meta = []
        for b in range(B):
            slots = valid[b].nonzero().flatten().tolist()
            meta.append((tuple(slots), *(tuple(c[b, slots].tolist()) for c in cols)))
        return meta

    def _layout(self, grid, ref_grid, K, meta, text_mask, subject_tokens):
        """Position ids [B, N, 3] (padding slots: 0), the self-attention mask and the cross-attention mask/bias."""
        cfg, device = self.cfg, text_mask.device
        B, L = text_mask.shape
        n_video, nr = math.prod(grid), ref_grid[0] * ref_grid[1]
        n = n_video + K * nr
        ids = torch.zeros(B, n, 3, dtype=torch.long)
        rows = []  # per sample: the sequence rows of its real tokens, in position_ids' order
        for b, (slots, subject, view, kind, group) in enumerate(meta):
            real = [torch.arange(n_video)] + [torch.arange(n_video + k * nr, n_video + (k + 1) * nr) for k in slots]
            rows.append(torch.cat(real))
            ids[b, rows[b]] = _sample_ids(cfg.position_scheme, cfg.ts_delta, grid, ref_grid, subject, view, kind, group)
        cross_mask = text_mask[:, None, None, :]
        if cfg.position_scheme == "lumosx" and K:
            # Padding tokens attend to themselves only (a defined softmax); no real token attends to them.
            self_mask = torch.eye(n, dtype=torch.bool).repeat(B, 1, 1)
            bias = torch.zeros(B, n, L)
            words = torch.zeros(B, 0, L) if subject_tokens is None else subject_tokens.bool().cpu()
            for b, (slots, subject, _, kind, group) in enumerate(meta):
                sample_mask, sample_bias = lumosx_masks(grid, [ref_grid] * len(slots), subject, kind, group, words[b])
                self_mask[b, rows[b][:, None], rows[b][None, :]] = sample_mask
                bias[b, rows[b]] = sample_bias
            bias = cfg.lumosx_bias_strength * bias.to(device)
            return ids, self_mask[:, None].to(device), bias.masked_fill(~cross_mask[:, 0], float("-inf"))[:, None]
        if all(len(m[0]) == K for m in meta):
            return ids, None, cross_mask  # no padding: no self-attention mask, so SDPA may use its fastest kernel
        valid = torch.zeros(B, n, dtype=torch.bool)
        for b, r in enumerate(rows):
            valid[b, r] = True
        return ids, valid[:, None, None, :].to(device), cross_mask


# ---- size and cost ------------------------------------------------------------------------------------------------


def param_count(cfg: DiTConfig) -> int:
    """Parameters of the model, counted on the meta device (no memory, any size)."""
    with torch.device("meta"):
        return sum(p.numel() for p in DiT(cfg).parameters())


def token_counts(cfg: DiTConfig, latent_grid: tuple[int, int, int], ref_hw: tuple[int, int], num_refs: int):
    """(video tokens, reference tokens) of one sample: latent [f, h, w] and K reference latents [h, w] (padding too)."""
    pt, ph, pw = cfg.patch
    f, h, w = latent_grid
    return (f // pt) * (h // ph) * (w // pw), num_refs * (ref_hw[0] // ph) * (ref_hw[1] // pw)


def forward_flops(cfg: DiTConfig, video_tokens: int, ref_tokens: int, text_len: int) -> int:
    """Matmul FLOPs of one sample's forward pass (2 per multiply-add), as torch's FlopCounterMode counts them:
    projections, FFN, the attention products over the full sequence (masks do not skip work), the embedders, head."""
    d, n, L = cfg.dim, video_tokens + ref_tokens, text_len
    per_token = 2 * (3 * d * d + d * d) + 2 * (2 * d * d) + 2 * 2 * d * cfg.ffn_dim  # self qkv/out, cross q/out, FFN
    attention = 2 * 2 * n * n * d + 2 * 2 * n * L * d  # (QK^T, AV) for self- and cross-attention
    blocks = cfg.depth * (n * per_token + attention + 2 * L * d * 2 * d)  # + the text k/v projections
    patch = math.prod(cfg.patch)
    embed = 2 * n * cfg.in_channels * patch * d + 2 * L * (cfg.text_dim * d + d * d)
    time = 2 * 2 * (cfg.freq_dim * d + d * d + d * 6 * d)  # the noisy t and t = 0, each through embed + projection
    head = 2 * video_tokens * d * cfg.in_channels * patch
    return blocks + embed + time + head


def flops_per_step(
    cfg: DiTConfig, batch_size: int, video_tokens: int, ref_tokens: int, text_len: int, backward: bool = True
) -> int:
    """Model FLOPs of one step for an MFU estimate: 3x the forward with backward (activation recompute not counted)."""
    return (3 if backward else 1) * batch_size * forward_flops(cfg, video_tokens, ref_tokens, text_len)
