"""The frozen encoders, built tiny from the real classes (diffusers AutoencoderKLWan, transformers UMT5EncoderModel and
T5Tokenizer), saved with save_pretrained and loaded back by path; and the on-disk cache of their outputs."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from pipeline.testing import synthetic_shards as synthetic
from trainer.data import DataConfig, make_loader
from trainer.encoders import (
    EmbeddingCache,
    TextEncoder,
    VideoVAE,
    build_tiny_text_encoder,
    build_tiny_vae,
    encode_batch_latents,
    encode_text_cached,
    subject_token_mask,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: see tests/conftest.py


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    return build_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny-wan-vae")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    return build_tiny_text_encoder(tmp_path_factory.mktemp("text") / "tiny-umt5")


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> dict:
    """A real loader batch: two square clips, one with 2 references + plate, one with 3 + plate (K = 4)."""
    paths = synthetic.write_synthetic_shards(tmp_path_factory.mktemp("syn"), 4, max_refs=3, size=(64, 64))
    cfg = DataConfig(shards=[str(p) for p in paths], buckets=[(5, 32, 32)], ref_size=(16, 16), batch_size=2,
                     epochs=1, shuffle_buffer=0)
    return next(b for b in make_loader(cfg) if b["ref_valid"].sum() == 7)


def test_vae_shapes_ratios_and_normalisation(vae_dir):
    vae = VideoVAE.from_pretrained(vae_dir)
    assert (vae.latent_channels, vae.temporal_ratio, vae.spatial_ratio) == (4, 4, 8)
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    latents = vae.encode(video)
    assert latents.shape == (1, 4, 3, 4, 6) == (1, *vae.latent_shape(9, 32, 48))
    raw = vae.vae.encode(video).latent_dist.mean
    mean = torch.tensor(vae.vae.config.latents_mean).view(1, 4, 1, 1, 1)
    std = torch.tensor(vae.vae.config.latents_std).view(1, 4, 1, 1, 1)
    assert torch.allclose(latents, (raw - mean) / std, atol=1e-5)
    decoded = vae.decode(latents)
    assert decoded.shape == video.shape and decoded.min() >= -1 and decoded.max() <= 1
    assert torch.allclose(decoded, vae.vae.decode(raw).sample.clamp(-1, 1), atol=1e-4)  # decode undoes the norm
    with pytest.raises(ValueError, match="1 \\+ k\\*4"):
        vae.encode(video[:, :, :8])


def test_vae_loads_from_a_pipeline_layout_and_encodes_references_as_frames(vae_dir, tmp_path):
    shutil.copytree(vae_dir, tmp_path / "pipeline" / "vae")
    vae = VideoVAE.from_pretrained(tmp_path / "pipeline")
    refs = torch.rand(2, 3, 3, 16, 16) * 2 - 1
    valid = torch.tensor([[True, True, False], [True, False, False]])
    out = vae.encode_refs(refs, valid)
    assert out.shape == (2, 3, 4, 1, 2, 2)
    assert (out[~valid] == 0).all()
    assert torch.allclose(out[1, 0], vae.encode(refs[1, 0][None, :, None])[0], atol=1e-5)


def test_subject_tokens_of_a_caption_with_two_subjects(text_dir):
    encoder = TextEncoder.from_pretrained(text_dir, max_length=24)
    caption = "A woman in an orange spacesuit and a tabby cat sit on a lawn."
    words = [["woman, orange, spacesuit", "tabby cat", "man"]]
    out = encoder.encode([caption], words)
    tokens = encoder.tokenizer.convert_ids_to_tokens(encoder.tokenizer(caption)["input_ids"])
    # ▁A ▁woman ▁in ▁an ▁orange ▁spacesuit ▁and ▁a ▁tabby ▁cat ▁s i t ▁on ▁a ▁lawn . </s>
    assert tokens[:10] == ["▁A", "▁woman", "▁in", "▁an", "▁orange", "▁spacesuit", "▁and", "▁a", "▁tabby",
                           "▁cat"]
    assert out.subject_tokens.shape == (1, 3, 24)
    assert out.subject_tokens[0, 0].nonzero().flatten().tolist() == [1, 4, 5]
    assert out.subject_tokens[0, 1].nonzero().flatten().tolist() == [8, 9]
    assert not out.subject_tokens[0, 2].any()  # "man" is not the "man" inside "woman"
    n = len(tokens)
    assert out.emb.shape == (1, 24, encoder.dim) and out.mask[0].tolist() == [True] * n + [False] * (24 - n)
    assert (out.emb[0, n:] == 0).all() and out.emb[0, :n].abs().sum() > 0
    assert encoder.encode([caption], None).subject_tokens.shape == (1, 0, 24)


def test_subject_token_mask_uses_character_offsets():
    offsets = [(0, 1), (2, 7), (8, 13), (13, 14), (0, 0)]  # "A tabby kitty." + </s>
    mask = subject_token_mask("A tabby kitty.", ["Tabby kitty", ["kitty"], ""], offsets, 6)
    assert mask.tolist() == [[False, True, True, False, False, False], [False, False, True, False, False, False],
                             [False] * 6]


def test_latent_cache_hits_identically_and_misses_a_changed_encoder(vae_dir, batch, tmp_path):
    vae = VideoVAE.from_pretrained(vae_dir)
    cache = EmbeddingCache.for_encoder(tmp_path / "cache", vae)
    fresh = encode_batch_latents(vae, batch, cache)
    assert (cache.hits, cache.misses) == (0, 2)
    assert len(list(cache.dir.glob("*.safetensors"))) == 2
    again = encode_batch_latents(vae, batch, cache)
    assert (cache.hits, cache.misses) == (2, 2)
    plain = encode_batch_latents(vae, batch)
    for a, b, c in zip(fresh, again, plain):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert again[1].shape == (2, 4, 4, 1, 2, 2) and (again[1][~batch["ref_valid"]] == 0).all()
    # Other weights under the same name (a checkpoint replaced in place): a new fingerprint, so entries miss.
    changed = VideoVAE.from_pretrained(build_tiny_vae(vae_dir.parent / "changed", seed=1))
    changed.name = vae.name
    stale = EmbeddingCache.for_encoder(tmp_path / "cache", changed)
    assert stale.dir == cache.dir and stale.get(batch["cache_key"][0]) is None
    assert not torch.equal(encode_batch_latents(changed, batch, stale)[0], fresh[0])


def test_text_cache_hits_identically_and_misses_a_changed_encoder(text_dir, batch, tmp_path):
    encoder = TextEncoder.from_pretrained(text_dir, max_length=32)
    cache = EmbeddingCache.for_encoder(tmp_path, encoder)
    fresh = encode_text_cached(encoder, batch["caption"], batch["subject_words"], cache)
    again = encode_text_cached(encoder, batch["caption"], batch["subject_words"], cache)
    plain = encoder.encode(batch["caption"], batch["subject_words"])
    assert (cache.hits, cache.misses) == (2, 2)
    for name in ("emb", "mask", "subject_tokens"):
        assert torch.equal(getattr(fresh, name), getattr(again, name)) and torch.equal(getattr(fresh, name),
                                                                                      getattr(plain, name))
    assert fresh.subject_tokens.shape[1] == max(len(w) for w in batch["subject_words"])
    longer = TextEncoder.from_pretrained(text_dir, max_length=40)  # changes the output: another fingerprint
    assert EmbeddingCache.for_encoder(tmp_path, longer).get(next(iter(cache.dir.glob("*"))).stem) is None
