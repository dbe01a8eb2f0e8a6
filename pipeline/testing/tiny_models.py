"""Tiny random-init models of every production model class, saved with their libraries' own save functions into
one directory each, and loaded by path through the project's loader: for the stage tests, for tests that run several
model stages together, and for benchmarks/model_stages.py. Random weights give arbitrary outputs, so what a test can
assert is the contract (shapes, bounds, batching invariance, the weights round trip), never quality."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.testing.tiny_qwen import build_tiny_qwen

# --- Grounding DINO: tiny Swin + 1-layer BERT, d_model 32, 2 decoder layers, 30 queries -------------------------------
GDINO_WORDS = ["woman", "cup", "person", "astronaut", "coffee", "red", "car", "sky", "sung", "##lasses"]


def tiny_vocab() -> list[str]:
    """BERT-uncased's layout for the ids that matter: the model hard-codes [CLS]=101, [SEP]=102, "."=1012 and
    "?"=1029 as the phrase delimiters of its text self-attention, so the tiny vocabulary puts them there too."""
    vocab = ["[PAD]"] + [f"[unused{i}]" for i in range(99)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab += [f"[unused{i}]" for i in range(len(vocab), 1012)] + ["."]
    vocab += [f"[unused{i}]" for i in range(len(vocab), 1029)] + ["?"]
    return vocab + GDINO_WORDS


def save_tiny_grounding_dino(path, box_bias=None):
    """Build, perturb and save the tiny model and its processor into `path`; return the saved state dict.

    `box_bias` pins the box head: zero weights in its last layer and this (cx, cy, w, h) bias in logit space, so
    every query's box saturates to a known value whatever the decoder computes."""
    from transformers import (
        BertConfig,
        BertTokenizer,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    vocab = tiny_vocab()
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(path / "vocab.txt"))
    swin = SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=4, out_indices=[2, 3, 4])
    bert = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=64)
    config = GroundingDinoConfig(
        backbone_config=swin, text_config=bert, d_model=32, encoder_layers=1, decoder_layers=2,
        encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2, decoder_attention_heads=2,
        num_queries=30, encoder_n_points=1, decoder_n_points=1, max_text_len=64,
    )
    torch.manual_seed(0)
    model = GroundingDinoForObjectDetection(config).eval()
    # Shift every weight away from what a fresh init gives, so a loader that re-inits cannot pass. Parameters,
    # not the state dict: the tied box heads are one tensor under several names.
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        if box_bias is not None:
            head = model.bbox_embed[-1].layers[-1]
            head.weight.zero_()
            head.bias.copy_(torch.tensor(box_bias, dtype=torch.float32))
    # A small input size keeps the tiny model fast; the real processors resize to 800 px.
    image_processor = GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(path)
    model.save_pretrained(path)
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- SAM (segment-anything layout and transformers' SamModel) ---------------------------------------------------------
# A 64-px SAM: 4x4 patch grid, one window of 4 patches, 32-d prompt space.
TINY_SAM = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1], "image_size": 64,
            "window_size": 4, "prompt_embed_dim": 32, "decoder_mlp_dim": 64, "decoder_num_heads": 2,
            "iou_head_hidden_dim": 32}
TINY_HF_SAM = {
    "vision_config": {"hidden_size": 32, "output_channels": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 64, "patch_size": 16, "window_size": 4, "global_attn_indexes": [1],
                      "num_pos_feats": 16, "mlp_dim": 64},
    "prompt_encoder_config": {"hidden_size": 32, "image_size": 64, "patch_size": 16},
    "mask_decoder_config": {"hidden_size": 32, "mlp_dim": 64, "num_attention_heads": 2, "iou_head_hidden_dim": 32},
}


# --- open_clip ------------------------------------------------------------------------------------------------------
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "layers": 2, "width": 32, "head_width": 16, "patch_size": 16},
    # vocab 49408 and context 77: what open_clip's bundled BPE tokenizer produces.
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def build_tiny_models(root: Path) -> dict[str, Path]:
    """{"qwen", "gdino", "sam", "clip"} -> model directories under root."""
    import open_clip
    from safetensors.torch import save_file

    from stages.segmentation import SamArchitecture, build_sam

    qwen = build_tiny_qwen(root / "qwen")
    (root / "gdino").mkdir()
    save_tiny_grounding_dino(root / "gdino")
    (root / "sam").mkdir()
    torch.manual_seed(0)
    sam = build_sam(SamArchitecture(**TINY_SAM))
    save_file(sam.state_dict(), str(root / "sam" / "sam.safetensors"))
    (root / "sam" / "sam_config.json").write_text(json.dumps(TINY_SAM))
    (root / "clip").mkdir()
    save_file(open_clip.CLIP(**TINY_CLIP).state_dict(), str(root / "clip" / "open_clip_model.safetensors"))
    (root / "clip" / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP}))
    return {"qwen": qwen, "gdino": root / "gdino", "sam": root / "sam", "clip": root / "clip"}
