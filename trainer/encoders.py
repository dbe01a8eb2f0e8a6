"""The frozen encoders: Wan's video VAE (diffusers `AutoencoderKLWan`) and a T5/UMT5 text encoder (transformers),
loaded from a local directory or a hub id; tiny random-init builds of the same classes for tests; and an optional
cache of their outputs on disk.

Both accept a diffusers pipeline directory too (`vae/`, `text_encoder/`, `tokenizer/` subfolders are found).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trainer.data import WORD_SEP


def _subfolder(path_or_id: str | Path, name: str, subfolder: str | None) -> tuple[str, str | None]:
    """A local diffusers pipeline directory holds each part in a subfolder; a part's own directory does not."""
    if subfolder is None and (Path(path_or_id) / name).is_dir():
        subfolder = name
    return str(path_or_id), subfolder


def _weights_digest(module: torch.nn.Module) -> str:
    """A content digest of the weights (sums per tensor, in float64): changes when any weight changes materially,
    without hashing gigabytes of bytes."""
    digest = hashlib.sha256()
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            t = tensor.detach()
            digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
            if t.is_floating_point() and t.numel():
                stats = torch.stack([t.sum(dtype=torch.float64), t.abs().sum(dtype=torch.float64),
                                     t.flatten()[:: max(1, t.numel() // 64)].to(torch.float64).sum()])
                digest.update(stats.cpu().numpy().tobytes())
    return digest.hexdigest()


def _safe_name(name: str) -> str:
    return re.sub(r"[^\w.-]+", "_", name).strip("_.")[-120:] or "encoder"


class VideoVAE:
    """Wan's video VAE: video in [-1, 1] <-> latents normalised per channel with the config's latents_mean/std.

    Encoding takes the posterior mean (deterministic, so cached latents equal fresh ones). Frame counts must be
    1 + k * temporal_ratio; a reference image is a 1-frame video.
    """

    def __init__(self, vae, name: str):
        self.vae = vae.eval().requires_grad_(False)
        self.name = name
        config = vae.config
        self.latent_channels = int(config.z_dim)
        self.temporal_ratio = int(config.get("scale_factor_temporal") or 2 ** sum(config.temperal_downsample))
        self.spatial_ratio = int(config.get("scale_factor_spatial") or 2 ** (len(config.dim_mult) - 1))
        shape = (1, self.latent_channels, 1, 1, 1)
        mean, std = config.get("latents_mean"), config.get("latents_std")
        self._mean = torch.tensor(mean, dtype=torch.float32).view(shape) if mean else None
        self._std = torch.tensor(std, dtype=torch.float32).view(shape) if std else None
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu",
                        subfolder: str | None = None) -> VideoVAE:
        from diffusers import AutoencoderKLWan

        path, subfolder = _subfolder(path_or_id, "vae", subfolder)
        vae = AutoencoderKLWan.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype).to(device)
        return cls(vae, f"{path}/{subfolder}" if subfolder else path)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    @property
    def fingerprint(self) -> str:
        """What the cache checks: class, config, dtype and weights."""
        if self._fingerprint is None:
            config = json.dumps(dict(self.vae.config), sort_keys=True, default=str)
            self._fingerprint = hashlib.sha256(
                f"{type(self.vae).__name__}|{config}|{self.dtype}|mean|{_weights_digest(self.vae)}".encode()
            ).hexdigest()
        return self._fingerprint

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        return (self.latent_channels, (frames - 1) // self.temporal_ratio + 1, height // self.spatial_ratio,
                width // self.spatial_ratio)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> normalised latents float32 [B, C, f, h, w]."""
        frames, height, width = video.shape[2:]
        if (frames - 1) % self.temporal_ratio or height % self.spatial_ratio or width % self.spatial_ratio:
            raise ValueError(f"video of {frames}x{height}x{width}: frames must be 1 + k*{self.temporal_ratio}, "
                             f"height and width multiples of {self.spatial_ratio}")
        latents = self.vae.encode(video.to(self.device, self.dtype)).latent_dist.mode().float()
        if self._mean is not None:
            latents = (latents - self._mean.to(latents.device)) / self._std.to(latents.device)
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, C, f, h, w] -> video float32 [B, 3, F, H, W] clamped to [-1, 1]."""
        latents = latents.to(self.device, torch.float32)
        if self._mean is not None:
            latents = latents * self._std.to(latents.device) + self._mean.to(latents.device)
        return self.vae.decode(latents.to(self.dtype)).sample.float().clamp(-1, 1)

    def encode_refs(self, refs: torch.Tensor, ref_valid: torch.Tensor) -> torch.Tensor:
        """[B, K, 3, H, W] images -> [B, K, C, 1, h, w] latents; padding references stay zero (never encoded)."""
        b, k, _, height, width = refs.shape
        out = torch.zeros(b, k, *self.latent_shape(1, height, width), device=self.device)
        if ref_valid.any():
            out[ref_valid.to(out.device)] = self.encode(refs[ref_valid].unsqueeze(2))
        return out


@dataclass
class TextBatch:
    emb: torch.Tensor  # [B, L, D] float; zero past each caption's tokens (as Wan does)
    mask: torch.Tensor  # [B, L] bool: real tokens (</s> included)
    subject_tokens: torch.Tensor  # [B, S, L] bool: caption tokens naming subject slot s

    def to(self, device) -> TextBatch:
        return TextBatch(self.emb.to(device), self.mask.to(device), self.subject_tokens.to(device))


def subject_token_mask(caption: str, slots: list, offsets: list[tuple[int, int]], length: int) -> torch.Tensor:
    """[S, length] bool: token j belongs to slot s when its character span overlaps a whole-word, case-insensitive
    occurrence of one of the slot's phrases (a slot is a WORD_SEP-joined string or a list of phrases)."""
    mask = torch.zeros(len(slots), length, dtype=torch.bool)
    for s, slot in enumerate(slots):
        phrases = slot.split(WORD_SEP.strip()) if isinstance(slot, str) else slot
        for phrase in filter(None, (p.strip() for p in phrases)):
            for match in re.finditer(rf"(?<!\w){re.escape(phrase)}(?!\w)", caption, flags=re.IGNORECASE):
                for j, (start, end) in enumerate(offsets[:length]):
                    if end > start and start < match.end() and end > match.start():
                        mask[s, j] = True
    return mask


class TextEncoder:
    """A T5 or UMT5 encoder (Wan uses umt5-xxl) with its tokenizer; captions padded to `max_length` tokens."""

    def __init__(self, model, tokenizer, name: str, max_length: int = 512):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.name = name
        self.max_length = max_length
        self.dim = int(model.config.d_model)
        self._fingerprint: str | None = None

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, dtype: torch.dtype = torch.float32, max_length: int = 512,
                        device: str = "cpu", subfolder: str | None = None) -> TextEncoder:
        from transformers import AutoConfig, AutoTokenizer, T5EncoderModel, UMT5EncoderModel

        path, model_sub = _subfolder(path_or_id, "text_encoder", subfolder)
        tokenizer_sub = "tokenizer" if model_sub == "text_encoder" else model_sub
        config = AutoConfig.from_pretrained(path, subfolder=model_sub or "")
        classes = {"umt5": UMT5EncoderModel, "t5": T5EncoderModel}
        if config.model_type not in classes:
            raise ValueError(f"text encoder {path}: model_type {config.model_type!r}, expected one of "
                             f"{sorted(classes)}")
        model = classes[config.model_type].from_pretrained(path, subfolder=model_sub or "", dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder=tokenizer_sub or "")
        return cls(model, tokenizer, f"{path}/{model_sub}" if model_sub else path, max_length)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def fingerprint(self) -> str:
        """What the cache checks: class, config, dtype, weights, vocabulary and max_length."""
        if self._fingerprint is None:
            vocab = hashlib.sha256(json.dumps(self.tokenizer.get_vocab(), sort_keys=True).encode()).hexdigest()
            self._fingerprint = hashlib.sha256(
                f"{type(self.model).__name__}|{self.model.config.to_json_string()}|{self.model.dtype}|"
                f"{vocab}|{self.max_length}|{_weights_digest(self.model)}".encode()
            ).hexdigest()
        return self._fingerprint

    @torch.no_grad()
    def encode(self, captions: list[str], subject_words: list[list] | None = None) -> TextBatch:
        tokens = self.tokenizer(captions, padding="max_length", max_length=self.max_length, truncation=True,
                                return_offsets_mapping=True, return_tensors="pt")
        mask = tokens["attention_mask"].bool()
        emb = self.model(input_ids=tokens["input_ids"].to(self.device),
                         attention_mask=tokens["attention_mask"].to(self.device)).last_hidden_state.float()
        emb = emb * mask.to(emb.device).unsqueeze(-1)
        slots = subject_words or [[] for _ in captions]
        subject = torch.zeros(len(captions), max((len(s) for s in slots), default=0), self.max_length,
                              dtype=torch.bool)
        for i, (caption, words) in enumerate(zip(captions, slots)):
            offsets = [tuple(o) for o in tokens["offset_mapping"][i].tolist()]
            subject[i, : len(words)] = subject_token_mask(caption, words, offsets, self.max_length)
        return TextBatch(emb, mask.to(emb.device), subject.to(emb.device))


class EmbeddingCache:
    """Encoder outputs on disk: ROOT/NAME/KEY.safetensors, each stamped with the encoder's fingerprint. A file
    written by another encoder (other weights, config, dtype, tokenizer) is a miss and is overwritten."""

    def __init__(self, root: str | Path, name: str, fingerprint: str):
        self.dir = Path(root) / _safe_name(name)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.fingerprint = fingerprint
        self.hits = self.misses = 0

    @classmethod
    def for_encoder(cls, root: str | Path, encoder: VideoVAE | TextEncoder) -> EmbeddingCache:
        return cls(root, encoder.name, encoder.fingerprint)

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.dir / f"{key}.safetensors"
        if path.exists():
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("fingerprint") == self.fingerprint:
                    self.hits += 1
                    return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - not a dict
        self.misses += 1
        return None

    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        path = self.dir / f"{key}.safetensors"
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"fingerprint": self.fingerprint})
        os.replace(tmp, path)  # atomic: ranks sharing the cache never read half a file


def encode_batch_latents(vae: VideoVAE, batch: dict,
                         cache: EmbeddingCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A loader batch's video and reference latents ([B, C, f, h, w], [B, K, C, 1, h', w']), through the cache
    when given (keyed by the batch's `cache_key`: the sample and exactly what was decoded from it)."""
    if cache is None:
        return vae.encode(batch["video"]), vae.encode_refs(batch["refs"], batch["ref_valid"])
    found = [cache.get(key) for key in batch["cache_key"]]
    missing = [i for i, entry in enumerate(found) if entry is None]
    if missing:
        index = torch.tensor(missing)
        video = vae.encode(batch["video"][index])
        refs = vae.encode_refs(batch["refs"][index], batch["ref_valid"][index])
        for n, i in enumerate(missing):
            found[i] = {"video": video[n], "refs": refs[n][batch["ref_valid"][i].to(refs.device)]}
            cache.put(batch["cache_key"][i], found[i])
    b, k = batch["ref_valid"].shape
    latents = torch.stack([entry["video"].to(vae.device) for entry in found])
    refs = torch.zeros(b, k, *vae.latent_shape(1, *batch["refs"].shape[-2:]), device=vae.device)
    for i, entry in enumerate(found):
        refs[i, batch["ref_valid"][i].to(vae.device)] = entry["refs"].to(vae.device)
    return latents, refs


def encode_text_cached(encoder: TextEncoder, captions: list[str], subject_words: list[list] | None,
                       cache: EmbeddingCache | None = None) -> TextBatch:
    """`encoder.encode` through the cache, keyed by a digest of each caption and its subject words."""
    if cache is None:
        return encoder.encode(captions, subject_words)
    slots = subject_words or [[] for _ in captions]
    keys = [hashlib.sha256(json.dumps([c, w]).encode()).hexdigest()[:32] for c, w in zip(captions, slots)]
    found = [cache.get(key) for key in keys]
    missing = [i for i, entry in enumerate(found) if entry is None]
    if missing:
        fresh = encoder.encode([captions[i] for i in missing], [slots[i] for i in missing])
        for n, i in enumerate(missing):
            found[i] = {"emb": fresh.emb[n], "mask": fresh.mask[n],
                        "subject_tokens": fresh.subject_tokens[n, : len(slots[i])]}
            cache.put(keys[i], found[i])
    s = max((len(w) for w in slots), default=0)
    subject = torch.zeros(len(captions), s, encoder.max_length, dtype=torch.bool)
    for i, entry in enumerate(found):
        subject[i, : entry["subject_tokens"].shape[0]] = entry["subject_tokens"]
    emb, mask = (torch.stack([entry[name] for entry in found]) for name in ("emb", "mask"))
    return TextBatch(emb, mask, subject).to(encoder.device)


# Words a tiny tokenizer knows whole (captions of the demo corpus and the synthetic shards); anything else falls
# back to single characters, so every ASCII caption tokenizes with real offsets.
TINY_WORDS = (
    "a an the and in on of with while at by to side appear appears stands sits rests is are parked films barely "
    "visible shot which very dark underexposed heavily blurred out-of-focus camera pans tilts zooms slowly left right "
    "up down in front woman man cat tabby cup coffee saucer rocket white red orange grey green motorcycle tripod "
    "spacesuit smiling upright wall brick lawn grassy gravel path rows old coins table surface moon cratered night "
    "sky galaxies page printed text"
)


def _tiny_tokenizer():
    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(f"▁{w}", -2.0) for w in dict.fromkeys(TINY_WORDS.split())]
    vocab += [(c, -8.0) for c in chars] + [(f"▁{c}", -8.5) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def build_tiny_text_encoder(out_dir: str | Path, d_model: int = 32, seed: int = 0) -> Path:
    """A random-init 2-layer UMT5 encoder and a small Unigram T5 tokenizer, saved with save_pretrained."""
    from transformers import UMT5Config, UMT5EncoderModel

    out = Path(out_dir)
    tokenizer = _tiny_tokenizer()
    config = UMT5Config(vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                        num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=32,
                        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = UMT5EncoderModel(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def build_tiny_vae(out_dir: str | Path, z_dim: int = 4, base_dim: int = 8, seed: int = 0) -> Path:
    """A random-init AutoencoderKLWan with Wan's 4x temporal / 8x spatial ratios, saved with save_pretrained."""
    from diffusers import AutoencoderKLWan

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae = AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                               temperal_downsample=[False, True, True],
                               latents_mean=torch.linspace(-0.5, 0.5, z_dim).tolist(),
                               latents_std=torch.linspace(0.8, 1.6, z_dim).tolist())
    vae.save_pretrained(out_dir)
    return Path(out_dir)
