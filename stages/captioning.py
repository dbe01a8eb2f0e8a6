"""Captioning: Qwen2.5-VL writes a subject-centric caption from a clip's keyframes.

A caption given in the input metadata wins unless `caption.replace_metadata_captions` is set. All records of a
batch that need a caption go through ONE `generate` call (one chat per record, its keyframes as several images of
one user message, left-padded), decoded greedily so a rerun writes the same caption.

The model is `pipeline.models.qwen_vl.QwenVL`, the Qwen2.5-VL chat wrapper the VLM entity stage uses too.
"""

from __future__ import annotations

from pipeline.core.record import Record
from pipeline.core.stage import Stage
from pipeline.models.qwen_vl import QwenVL, load_prompt

CAPTION_SOURCE = "qwen2.5-vl"


class Captioner(Stage):
    """Writes `meta["caption"] = {"text", "source": "qwen2.5-vl", "model"}` for clips without a metadata caption
    (or for all clips with `replace_metadata_captions`). An empty reply is an `empty_caption` error on the clip."""

    name = "caption"
    requires = ("keyframes",)
    stateful = True

    section = "caption"  # resources come from config.caption.resources

    def setup(self) -> None:
        cfg = self.config.caption
        self.prompt = load_prompt(cfg.prompt_file, "caption.txt")
        self.vlm = QwenVL(cfg.model, role="caption", max_pixels=cfg.max_pixels) if cfg.model is not None else None

    def process(self, records: list[Record]) -> list[Record]:
        if not hasattr(self, "vlm"):
            self.setup()
        cfg = self.config.caption
        todo: list[Record] = []
        for record in records:
            caption = record.meta.get("caption") or {}
            if caption.get("text") and not cfg.replace_metadata_captions:
                continue
            if self.vlm is None:
                continue  # metadata captions only; the entity stage warns about clips left without one
            todo.append(record)
        if not todo:
            return records

        chats, images = [], []
        for record in todo:
            frames = [self.vlm.fit(frame) for frame in record.blobs["keyframes"]]
            text = self.prompt.safe_substitute(num_frames=len(frames))
            chats.append([{"role": "user",
                           "content": [{"type": "image"} for _ in frames] + [{"type": "text", "text": text}]}])
            images.append(frames)
        replies = self.vlm.generate(chats, images, cfg.max_new_tokens)

        for record, reply in zip(todo, replies):
            if not reply:
                record.fail(self.name, "empty_caption", f"{cfg.model.path} generated no text for the keyframes")
                continue
            record.meta["caption"] = {"text": reply, "source": CAPTION_SOURCE, "model": cfg.model.path}
        return records

    def provenance_of(self, record: Record) -> str | None:
        cfg = self.config.caption
        caption = record.meta.get("caption") or {}
        if self.vlm is not None and caption.get("source") == CAPTION_SOURCE and caption.get("model") == cfg.model.path:
            return f"{self.vlm.describe()} max_new_tokens={cfg.max_new_tokens}"  # captioned here
        if caption.get("text") and not cfg.replace_metadata_captions:
            return f"caption from the input {caption.get('source')}"
        return None  # metadata captions only, and this clip has none
