"""Qwen2.5-VL, the one VLM wrapper (captioning and entity binding ask it), and the prompt templates it is given."""

from __future__ import annotations

import copy
import string
from pathlib import Path

import numpy as np

from pipeline.core.config import ModelSpec
from pipeline.models.loader import load_pretrained, load_processor, torch_device

PROMPTS_DIR = Path(__file__).with_name("prompts")


def load_prompt(prompt_file: str | None, default_name: str, required: tuple[str, ...] = ()) -> string.Template:
    """The prompt template at `prompt_file`, or the bundled `pipeline/models/prompts/<default_name>`.

    Templates use `$name` placeholders (string.Template), so JSON braces in a prompt need no escaping. Raises
    ValueError naming the file when it is missing or lacks a required placeholder."""
    path = Path(prompt_file).expanduser() if prompt_file else PROMPTS_DIR / default_name
    if not path.is_file():
        raise ValueError(f"prompt file not found: {path}")
    template = string.Template(path.read_text())
    names = {m.group("named") or m.group("braced") for m in template.pattern.finditer(template.template)}
    missing = [name for name in required if name not in names]
    if missing:
        raise ValueError(f"prompt file {path} lacks the placeholder(s) {', '.join('$' + n for n in missing)}")
    return template


class QwenVL:
    """A Qwen2.5-VL model and its processor, loaded once through `pipeline.models.loader`, answering batches of chats.

    Images are resized by Qwen's own rule (sides multiples of 28, at most `max_pixels` pixels) before they reach
    the processor, so callers can draw on, and give coordinates in, exactly the image the model sees.
    """

    def __init__(self, spec: ModelSpec, role: str, max_pixels: int):
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        self.spec = spec
        self.model = load_pretrained(Qwen2_5_VLForConditionalGeneration, spec, role)
        self.processor = load_processor(AutoProcessor, spec, role)
        # Decoder-only batched generation appends new tokens after the last column: every prompt must end there.
        self.processor.tokenizer.padding_side = "left"
        image_processor = self.processor.image_processor
        self.factor = image_processor.patch_size * image_processor.merge_size
        self.max_pixels = max_pixels
        self.min_pixels = min(_size_bound(image_processor.size, "shortest_edge", 56 * 56), max_pixels)
        generation = copy.deepcopy(self.model.generation_config)
        # Greedy whatever the checkpoint's generation_config asks for (Qwen ships sampling settings): reruns
        # must write the same text. Unset sampling knobs so generate does not warn that they are ignored.
        generation.do_sample, generation.num_beams = False, 1
        generation.temperature = generation.top_p = generation.top_k = None
        if generation.pad_token_id is None:
            generation.pad_token_id = self.processor.tokenizer.pad_token_id
        self.generation = generation
        self.device = torch_device(spec)

    def describe(self) -> str:
        return (f"qwen2.5-vl {self.spec.path} dtype={self.spec.dtype} device={self.device} "
                f"greedy max_pixels={self.max_pixels}")

    def fit(self, rgb: np.ndarray) -> np.ndarray:
        """`rgb` resized to the size the processor would give it, so the processor leaves it as it is."""
        import cv2
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        h, w = rgb.shape[:2]
        new_h, new_w = smart_resize(h, w, factor=self.factor, min_pixels=self.min_pixels, max_pixels=self.max_pixels)
        if (new_h, new_w) == (h, w):
            return rgb
        interpolation = cv2.INTER_AREA if new_h * new_w < h * w else cv2.INTER_CUBIC
        return cv2.resize(rgb, (new_w, new_h), interpolation=interpolation)

    def generate(self, chats: list[list[dict]], images: list[list[np.ndarray]], max_new_tokens: int) -> list[str]:
        """One greedy `generate` call for a batch of chats; returns each chat's reply, stripped.

        `chats[i]` is a message list whose `{"type": "image"}` parts take `images[i]` in order (already `fit`)."""
        import torch
        from PIL import Image

        texts = [self.processor.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
        flat = [Image.fromarray(image) for row in images for image in row]
        kwargs = {}
        if flat:
            kwargs["images"] = flat
            kwargs["images_kwargs"] = {"size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels}}
        inputs = self.processor(text=texts, padding=True, return_tensors="pt", **kwargs).to(self.model.device)
        generation = copy.copy(self.generation)
        generation.max_new_tokens = max_new_tokens
        with torch.inference_mode():
            out = self.model.generate(**inputs, generation_config=generation)
        new_tokens = out[:, inputs["input_ids"].shape[1]:]
        replies = self.processor.batch_decode(new_tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        return [reply.strip() for reply in replies]


def _size_bound(size, key: str, default: int) -> int:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else default
