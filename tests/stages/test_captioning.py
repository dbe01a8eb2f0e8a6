"""Captioner on a tiny random-init Qwen2.5-VL saved with save_pretrained and loaded by path through the stage.

Random weights write gibberish, so these tests assert the stage contract: where captions come from, one generate
call per batch, greedy (repeatable) output, the token budget, and errors as data.
"""

from pathlib import Path

import cv2
import numpy as np
from skimage import data

from pipeline.core.config import build_config
from pipeline.core.record import Record
from pipeline.core.stage import run_stage
from stages.captioning import Captioner

MAX_NEW_TOKENS = 12



def make_stage(model_dir: Path, *overrides: str) -> Captioner:
    config = build_config(overrides=[f"caption.model.path={model_dir}", f"caption.max_new_tokens={MAX_NEW_TOKENS}",
                                     f"caption.max_pixels={112 * 112}", *overrides])
    stage = Captioner(config)
    stage.setup()
    return stage


class GenerateCounter:
    """Instrumentation, not a mock: calls the model's real `generate` and records each call and its output."""

    def __init__(self, model):
        self.inner = model.generate
        self.calls: list[dict] = []
        model.generate = self

    def __call__(self, **kwargs):
        out = self.inner(**kwargs)
        self.calls.append({"prompt_len": kwargs["input_ids"].shape[1], "rows": out.shape[0],
                           "new_tokens": out.shape[1] - kwargs["input_ids"].shape[1]})
        return out


def clip(key: str, image: np.ndarray, size: tuple[int, int], caption: dict | None = None) -> Record:
    """A clip record with three keyframes of a real photo at `size` (w, h), slightly shifted like a pan."""
    frame = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    keyframes = np.stack([np.roll(frame, 4 * i, axis=1) for i in range(3)])
    record = Record(kind="clip", source_path=f"{key}.mp4", key=key, meta={"caption": caption})
    record.blobs["keyframes"] = keyframes
    return record


def three_clips(**caption_of) -> list[Record]:
    # Different aspect ratios give different image-token counts, so the batch really needs padding.
    return [
        clip("a", data.astronaut(), (160, 160), caption_of.get("a")),
        clip("b", data.chelsea(), (224, 150), caption_of.get("b")),
        clip("c", data.coffee(), (120, 200), caption_of.get("c")),
    ]


def test_a_batch_is_captioned_in_one_generate_call_and_records_source_and_model(tiny_qwen):
    stage = make_stage(tiny_qwen)
    counter = GenerateCounter(stage.vlm.model)
    out = run_stage(stage, three_clips())
    assert len(counter.calls) == 1 and counter.calls[0]["rows"] == 3
    assert counter.calls[0]["new_tokens"] <= MAX_NEW_TOKENS
    for record in out:
        assert record.alive
        caption = record.meta["caption"]
        assert caption["source"] == "qwen2.5-vl" and caption["model"] == str(tiny_qwen)
        assert isinstance(caption["text"], str) and caption["text"] == caption["text"].strip() and caption["text"]
        assert "qwen2.5-vl" in record.meta["provenance"]["caption"]
        assert f"max_new_tokens={MAX_NEW_TOKENS}" in record.meta["provenance"]["caption"]


def test_captions_are_greedy_and_independent_of_the_batch(tiny_qwen):
    batched = [r.meta["caption"]["text"] for r in run_stage(make_stage(tiny_qwen), three_clips())]
    again = [r.meta["caption"]["text"] for r in run_stage(make_stage(tiny_qwen), three_clips())]
    assert batched == again
    # Left padding: a clip captioned inside a padded batch reads exactly as when it is captioned alone.
    stage = make_stage(tiny_qwen)
    alone = [run_stage(stage, [record])[0].meta["caption"]["text"] for record in three_clips()]
    assert alone == batched
    assert stage.vlm.processor.tokenizer.padding_side == "left"


def test_a_larger_budget_writes_longer_captions(tiny_qwen):
    stage = make_stage(tiny_qwen, "caption.max_new_tokens=24")
    counter = GenerateCounter(stage.vlm.model)
    run_stage(stage, three_clips())
    assert MAX_NEW_TOKENS < counter.calls[0]["new_tokens"] <= 24


def test_metadata_captions_are_kept_unless_replacing_is_asked(tiny_qwen):
    given = {"text": "A woman in a red coat walks her dog.", "source": "metadata"}
    stage = make_stage(tiny_qwen)
    counter = GenerateCounter(stage.vlm.model)
    out = run_stage(stage, three_clips(b=dict(given)))
    assert out[1].meta["caption"] == given and "metadata" in out[1].meta["provenance"]["caption"]
    assert [r.meta["caption"]["source"] for r in out] == ["qwen2.5-vl", "metadata", "qwen2.5-vl"]
    assert counter.calls[0]["rows"] == 2  # only the clips without a caption reach the model

    everything_given = run_stage(stage, three_clips(a=dict(given), b=dict(given), c=dict(given)))
    assert len(counter.calls) == 1 and all(r.meta["caption"] == given for r in everything_given)

    replacing = make_stage(tiny_qwen, "caption.replace_metadata_captions=true")
    out = run_stage(replacing, three_clips(b=dict(given)))
    assert all(r.meta["caption"]["source"] == "qwen2.5-vl" for r in out)


def test_an_empty_reply_and_missing_keyframes_are_errors_on_their_clip_only(tiny_qwen):
    stage = make_stage(tiny_qwen)
    records = three_clips()
    del records[2].blobs["keyframes"]
    out = run_stage(stage, records)
    assert [r.alive for r in out] == [True, True, False]
    assert out[2].errors[0]["stage"] == "caption" and out[2].errors[0]["reason"] == "no_keyframes"

    # A model whose output layer is all zeros: every logit ties, greedy picks token 0 (<|endoftext|>), a special
    # token that decoding drops, so the reply is empty.
    stage.vlm.model.lm_head.weight.data.zero_()
    out = run_stage(stage, three_clips()[:1])
    assert out[0].errors == [{"stage": "caption", "reason": "empty_caption", "message": out[0].errors[0]["message"]}]
    assert out[0].meta["caption"] is None
