"""A tiny random-init Qwen2.5-VL (model + processor + tokenizer) saved with `save_pretrained`, for stage tests.

Everything is built offline: the byte-level BPE tokenizer is trained here with the `tokenizers` library and
wrapped in the real `Qwen2Tokenizer`; the processor is the real `Qwen2_5_VLProcessor`. Weights are random, so
generations are gibberish: tests assert the stage contract, not caption quality.
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The shape of Qwen2.5-VL's own template, cut down: system/user/assistant turns, images and videos as
# <|vision_start|><|image_pad|><|vision_end|> placeholders that the processor expands to the image's tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "A man in a black leather jacket and blue jeans walks next to a woman with a red hat on a busy street.",
    "The camera slowly pans left. A girl holds a white cup; a dog sits on the grass in a park at sunset.",
    ('{"subjects": [{"word": "man", "box": 1, "attributes": {"top": ["black shirt"], "bottom": [], '
    '"accessories": ["watch"], "hairstyle": ["short hair"], "footwear": []}}], "objects": [{"word": "guitar"}], '
    '"background": [{"word": "street"}]}'),
    "Describe each person in the video: appearance, clothing, objects, background and camera motion.",
    "box 1: [12, 30, 80, 200] box 2: [100, 28, 170, 210] null true false 0123456789",
]


def build_tokenizer():
    """A byte-level BPE `Qwen2Tokenizer` with Qwen's special tokens, trained on a few lines of text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer=trainer)
    vocab = bpe.get_vocab()
    merges = [tuple(pair) for pair in json.loads(bpe.to_str())["model"]["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,  # must be tuples, not "a b" strings
        unk_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_tiny_qwen(path: str | Path, seed: int = 0) -> Path:
    """Write a tiny Qwen2.5-VL model, processor and tokenizer to `path`; returns the path."""
    import torch
    from transformers import (
        GenerationConfig,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    path = Path(path)
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": 64,
            "fullatt_block_indexes": [1],
            "window_size": 56,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"], do_sample=False
    )
    model.save_pretrained(path)
    # Library-default pixel bounds, as a real checkpoint ships them: the stages pass their own max_pixels.
    image_processor = Qwen2VLImageProcessor()
    video_processor = Qwen2VLVideoProcessor()
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(path)
    return path
