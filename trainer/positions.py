"""Where reference tokens sit in the DiT's 3D RoPE space: four schemes from the S2V literature, as explicit ids.

Every token gets explicit (t, h, w) position ids; one RoPE kernel rotates queries and keys by them (model.py).
Wan's own RoPE only indexes a grid from 0, so reference layouts need explicit ids. Notation: the patchified video
latent is a T x H x W grid; reference i (in reference order) is an h_i x w_i grid; video ids are the plain grid
(t in 0..T-1, h in 0..H-1, w in 0..W-1).

Token order, for every scheme: the video tokens (t-major, then h, then w), then the reference tokens in reference
order, each reference h-major then w. Attention here is full (or masked per token, never causal by sequence
position), so sequence order carries no information: Kaleido's "references before the video" is a statement about
sequence order only, and the ids below are what it means for attention.

Only real references go in: callers drop padding first (model.py gives padding slots id (0, 0, 0) and masks them
out of attention as keys, so they produce tokens that nothing attends to).

Schemes
-------
``phantom`` (Phantom: "Subject-consistent video generation via cross-modal alignment", Liu et al. 2025):
    references appended after the video along time: reference i at t = T + i on the video's own h/w grid from 0.

``kaleido`` (Kaleido, open multi-subject reference video generation, 2025; R-RoPE as shipped): reference i at
    t = i, with h and w shifted past the video, h = H + 0..h_i-1, w = W + 0..w_i-1; all references share this one
    shifted spatial block (references are clean and out of the loss, as in every scheme here). The paper's
    ablation favours the W&H shift over plain concatenation, W-only, H-only and temporal-only variants. Open choice:
    the shift is this sample's H and W (the paper says "Hmax, Wmax"; with bucketed training every video in a batch
    has the same grid, and per-sample is what keeps the references adjacent to the video at any resolution).

``ts-rope`` ("MV-S2V: Multi-View Subject-Consistent Video Generation", 2026; Temporally Shifted RoPE): a fixed
    temporal shift delta between the video and the first reference and between the references of different
    subjects; the views of one subject sit at adjacent t. Subjects go in order of first appearance among the
    references, views of a subject by ``view_id`` (ties: reference order). The first subject's first view is at
    t = (T - 1) + delta, its next views at +1 each, the next subject's first view at (previous subject's last
    view) + delta; h/w on the video grid from 0. Open choice: the paper gives no delta; the default
    ``ts_delta = 4`` keeps the subject gap clearly larger than the view gap (1) while keeping t near the range a
    Wan backbone saw in pre-training (21 latent frames for 81 video frames). delta = 1 reduces to Phantom.
    References without a subject slot (subject id < 0, e.g. a background plate) each count as their own subject.

``lumosx`` ("LumosX: Relate Any Identities with Their Attributes for Personalized Video Generation", Xing et
    al. 2026; R2PE + the relational masks): references form branches; a subject group's references (kind 0:
    its face and its attribute crops, one ``group``) are one branch, every object or background reference is a
    branch of its own. Branches go in order of first appearance; branch b sits at t = T + b, so backgrounds and
    objects extend sequentially along t while a face and its attributes share one t. Within a subject branch the
    references are laid out along w, side by side like one composite image (reference j at w offset = the summed
    widths of the branch's earlier references, h from 0). Open choice: the paper says "along h/w" without the
    offsets; side by side keeps every token of the group at a distinct (h, w) with the smallest spatial extent.

``lumosx_masks`` builds LumosX's two masks for the same token order:
    - self-attention (causal in LumosX's sense): a video token attends to every token, video and conditions; a
      condition token attends only to the tokens of its own branch; conditions never attend to the video.
    - multilevel cross-attention bias over text tokens: +1 where a condition token meets its own subject slot's
      words (``subject_tokens[s]``: the word tag and, for subjects, the attribute words), -1 on the words of every
      other subject slot, 0 elsewhere. A word that belongs to both its own and another slot stays +1. Video tokens
      get 0 everywhere, not the union over subjects: the video must read the whole caption as the base model did
      (a +1 on all subject words would only re-weight subject words against the scene words, which no paper asks
      for, and moves a pretrained Wan away from its text attention). A reference with no subject slot (subject id
      outside 0..S-1, e.g. a background plate) gets a zero row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

SCHEMES = ("phantom", "kaleido", "ts-rope", "lumosx")
SUBJECT, OBJECT, BACKGROUND = 0, 1, 2  # ref_kind values


@dataclass(frozen=True)
class PositionConfig:
    """Knobs the papers leave open. ts_delta: TS-RoPE's temporal shift (video -> refs, subject -> subject)."""

    ts_delta: int = 4

    def __post_init__(self):
        if self.ts_delta < 1:
            raise ValueError(f"ts_delta must be >= 1, got {self.ts_delta}")


def _ints(values) -> list[int]:
    return [int(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]


def lumosx_branches(ref_kind: Sequence[int], ref_group: Sequence[int]) -> list[int]:
    """Branch index per reference, in order of first appearance: a subject group's references share one branch."""
    branch_of_group: dict[int, int] = {}
    branches, next_branch = [], 0
    for kind, group in zip(_ints(ref_kind), _ints(ref_group)):
        if kind == SUBJECT and group >= 0:
            if group not in branch_of_group:
                branch_of_group[group] = next_branch
                next_branch += 1
            branches.append(branch_of_group[group])
        else:
            branches.append(next_branch)
            next_branch += 1
    return branches


def ref_offsets(
    scheme: str,
    video_grid: tuple[int, int, int],
    ref_grids: Sequence[tuple[int, int]],
    ref_subject: Sequence[int],
    ref_view: Sequence[int],
    ref_kind: Sequence[int],
    ref_group: Sequence[int],
    cfg: PositionConfig | None = None,
) -> list[tuple[int, int, int]]:
    """(t, h0, w0) of each reference: its tokens are t, h0 + 0..h-1, w0 + 0..w-1."""
    cfg = cfg or PositionConfig()
    T, H, W = video_grid
    n = len(ref_grids)
    subject, view, kind, group = _ints(ref_subject), _ints(ref_view), _ints(ref_kind), _ints(ref_group)
    if not len(subject) == len(view) == len(kind) == len(group) == n:
        counts = f"{len(subject)}/{len(view)}/{len(kind)}/{len(group)}"
        raise ValueError(f"{n} ref_grids but {counts} ref_subject/ref_view/ref_kind/ref_group entries")
    if scheme == "phantom":
        return [(T + i, 0, 0) for i in range(n)]
    if scheme == "kaleido":
        return [(i, H, W) for i in range(n)]
    if scheme == "ts-rope":
        members: dict[int, list[int]] = {}  # subject key -> reference indices, in order of first appearance
        for i, s in enumerate(subject):
            members.setdefault(s if s >= 0 else -1 - i, []).append(i)
        offsets: list[tuple[int, int, int]] = [(0, 0, 0)] * n
        t = T - 1
        for refs in members.values():
            t += cfg.ts_delta
            for j, i in enumerate(sorted(refs, key=lambda i: (view[i], i))):
                offsets[i] = (t + j, 0, 0)
            t += len(refs) - 1
        return offsets
    if scheme == "lumosx":
        offsets, width_used = [], {}
        for i, b in enumerate(lumosx_branches(kind, group)):
            w0 = width_used.get(b, 0)
            offsets.append((T + b, 0, w0))
            width_used[b] = w0 + ref_grids[i][1]
        return offsets
    raise ValueError(f"position_scheme must be one of {SCHEMES}, got {scheme!r}")


def _grid_ids(t: torch.Tensor, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.stack(torch.meshgrid(t, h, w, indexing="ij"), -1).reshape(-1, 3)


def position_ids(
    scheme: str,
    video_grid: tuple[int, int, int],
    ref_grids: Sequence[tuple[int, int]],
    ref_subject: Sequence[int],
    ref_view: Sequence[int],
    ref_kind: Sequence[int],
    ref_group: Sequence[int],
    cfg: PositionConfig | None = None,
) -> torch.Tensor:
    """(t, h, w) ids, LongTensor [T*H*W + sum(h*w), 3]: video tokens, then each real reference's tokens in order."""
    T, H, W = video_grid
    offsets = ref_offsets(scheme, video_grid, ref_grids, ref_subject, ref_view, ref_kind, ref_group, cfg)
    parts = [_grid_ids(torch.arange(T), torch.arange(H), torch.arange(W))]
    for (t, h0, w0), (h, w) in zip(offsets, ref_grids):
        parts.append(_grid_ids(torch.tensor([t]), torch.arange(h0, h0 + h), torch.arange(w0, w0 + w)))
    return torch.cat(parts)


def lumosx_masks(
    video_grid: tuple[int, int, int],
    ref_grids: Sequence[tuple[int, int]],
    ref_subject: Sequence[int],
    ref_kind: Sequence[int],
    ref_group: Sequence[int],
    subject_tokens: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """LumosX's masks for the token order of ``position_ids``: (self-attention [N, N] bool, True = may attend;
    cross-attention bias [N, L] float in {+1, -1, 0}). ``subject_tokens``: [S, L] bool, the caption tokens of each
    subject slot. Real references only, as for ``position_ids``."""
    T, H, W = video_grid
    n_video = T * H * W
    sizes = [h * w for h, w in ref_grids]
    n = n_video + sum(sizes)
    branches = torch.tensor(lumosx_branches(ref_kind, ref_group), dtype=torch.long)
    # Per token: -1 for video, else the branch of its reference.
    per_ref = torch.tensor(sizes, dtype=torch.long)
    token_branch = torch.cat([torch.full((n_video,), -1), branches.repeat_interleave(per_ref)])
    is_video = token_branch < 0
    self_mask = is_video[:, None] | ((token_branch[:, None] == token_branch[None, :]) & ~is_video[None, :])

    subject_tokens = subject_tokens.bool()
    S, L = subject_tokens.shape
    ref_rows = []
    for s in _ints(ref_subject):
        if 0 <= s < S:
            own = subject_tokens[s]
            others = subject_tokens[torch.arange(S) != s].any(0)
            ref_rows.append(own.float() - (others & ~own).float())
        else:
            ref_rows.append(torch.zeros(L))
    bias = torch.zeros(n, L)
    if ref_rows:
        bias[n_video:] = torch.stack(ref_rows).repeat_interleave(per_ref, dim=0)
    return self_mask, bias
