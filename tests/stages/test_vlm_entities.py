"""VLM entity extraction: JSON parsing, validation and repair, conversion to entity dicts, the numbered person
boxes (LumosX's visual prior), and the re-ask loop driven end to end through a tiny random-init Qwen2.5-VL."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from skimage import data

from pipeline.core.config import build_config
from pipeline.core.record import Record
from pipeline.core.stage import run_stage
from stages.vlm_entities import (
    MalformedEntities,
    VlmEntityExtractor,
    boxes_prompt,
    draw_numbered_boxes,
    parse_entities,
    person_boxes,
    repair_json,
    to_entities,
)
from taxonomies.matcher import Taxonomy

CAPTION = ("A man on the left in a black shirt and a silver watch talks to a man on the right in a blue denim "
           "jacket, who holds an acoustic guitar on a busy street at dusk.")
GOOD = {
    "subjects": [
        {"word": "man", "box": 1, "attributes": {"top": ["black shirt"], "bottom": [], "accessories": ["silver watch"],
                                                 "hairstyle": [], "footwear": []}},
        {"word": "man", "box": 2, "attributes": {"top": ["blue denim jacket"]}},
    ],
    "objects": [{"word": "acoustic guitar"}],
    "background": [{"word": "busy street"}],
}
# Person boxes numbered as the stage numbers them: box 1 is the leftmost.
PRIORS = [{"index": 1, "keyframe": 1, "box": [10.0, 20.0, 60.0, 150.0]},
          {"index": 2, "keyframe": 1, "box": [100.0, 25.0, 150.0, 155.0]}]


@pytest.fixture(scope="module")
def taxonomy():
    return Taxonomy.load()



# ------------------------------------------------------------------------------ parsing, validation, repair
def test_good_json_becomes_entities_in_the_taxonomy_format(taxonomy):
    entities = to_entities(parse_entities(json.dumps(GOOD), CAPTION, num_boxes=2), CAPTION, taxonomy, PRIORS)
    assert [e["id"] for e in entities] == ["e0", "e1", "e2", "e3"]
    assert [e["kind"] for e in entities] == ["subject", "subject", "object", "background"]
    for entity in entities:
        assert CAPTION[entity["span"][0]:entity["span"][1]] == entity["word"]
    guitar, street = entities[2], entities[3]
    assert (guitar["category"], guitar["taxonomy_group"]) == ("guitar", "object")
    # "busy street" is no synonym; its head noun names the category.
    assert (street["word"], street["category"], street["taxonomy_group"]) == ("busy street", "street", "scene")
    assert "attributes" not in guitar and "box_prior" not in street
    left = entities[0]
    assert (left["category"], left["taxonomy_group"], left["group"]) == ("man", "human", "g0")
    # Empty attribute lists are left out, as the taxonomy path does.
    assert left["attributes"] == {"top": ["black shirt"], "accessories": ["silver watch"]}


def test_a_repeated_noun_binds_each_person_to_its_own_box_span_and_attributes(taxonomy):
    left, right = to_entities(parse_entities(json.dumps(GOOD), CAPTION, 2), CAPTION, taxonomy, PRIORS)[:2]
    first, second = CAPTION.index("man"), CAPTION.index("man", CAPTION.index("man") + 1)
    assert (left["span"][0], right["span"][0]) == (first, second)
    assert left["box_prior"] == PRIORS[0] and right["box_prior"] == PRIORS[1]
    assert (left["group"], right["group"]) == ("g0", "g1")
    assert right["attributes"] == {"top": ["blue denim jacket"]} and "watch" not in json.dumps(right)
    # Listed in the other order, each man still takes the mention his attributes follow.
    reordered = json.dumps({**GOOD, "subjects": GOOD["subjects"][::-1]})
    assert to_entities(parse_entities(reordered, CAPTION, 2), CAPTION, taxonomy, PRIORS)[:2] == [left, right]


def test_fenced_json_with_prose_and_trailing_commas_is_repaired(taxonomy):
    body = json.dumps(GOOD, indent=1).replace("]\n}", "],\n}").replace('"busy street"}', '"busy street",}')
    assert json.loads(repair_json(body)) == GOOD
    chatty = f"Sure! Here are the entities:\n```json\n{body}\n```\nLet me know if you need more."
    assert parse_entities(chatty, CAPTION, 2) == parse_entities(json.dumps(GOOD), CAPTION, 2)


def test_unknown_words_keep_the_word_as_category(taxonomy):
    caption = "A zorblax hovers over a woman in a field."
    answer = parse_entities('{"subjects": [{"word": "Woman"}], "objects": [{"word": "zorblax"}], '
                            '"background": [{"word": "field"}], "mood": "calm"}', caption, 0)
    entities = to_entities(answer, caption, taxonomy, [])
    assert [(e["word"], e["category"], e["taxonomy_group"]) for e in entities] == [
        ("zorblax", "zorblax", None), ("woman", "woman", "human"), ("field", "meadow", "scene")]
    assert entities[1]["box_prior"] is None and entities[1]["attributes"] == {}


@pytest.mark.parametrize("reply, problem", [
    ('{"subjects": [{"word": "dog"}]}', "'dog' does not occur in the caption"),
    ('{"subjects": [{"word": "ma"}]}', "'ma' does not occur"),  # whole words only
    ('{"subjects": [{"word": "man", "box": 3}]}', "box 3 is not a listed box"),
    ('{"subjects": [{"word": "man", "attributes": {"top": [7]}}]}', "subjects.0.attributes.top.0"),
    ('{"objects": [{"name": "guitar"}]}', "objects.0.word"),
    ('["man"]', "not an object"),
    ('the man, the guitar', "not a JSON object"),
    ('{"subjects": [{"word": "man"', "not a JSON object"),
])
def test_malformed_answers_say_what_is_wrong(reply, problem):
    with pytest.raises(MalformedEntities, match=problem.replace("[", r"\[").replace(".", r"\.")):
        parse_entities(reply, CAPTION, num_boxes=2)


# ------------------------------------------------------------------------------------ numbered person boxes
def test_numbered_boxes_are_drawn_on_their_borders_only():
    image = np.full((180, 240, 3), 128, np.uint8)
    boxes = [[20, 30, 100, 170], [140, 20, 220, 160]]
    drawn = draw_numbered_boxes(image, boxes)
    assert drawn.shape == image.shape and (image == 128).all()  # a copy; the keyframe is untouched
    for x0, y0, x1, y1 in boxes:
        for x, y in [((x0 + x1) // 2, y0), ((x0 + x1) // 2, y1), (x0, (y0 + y1) // 2), (x1, (y0 + y1) // 2)]:
            assert (drawn[y, x] != 128).any(), (x, y)
        # The middle of the box (the person) and the number's corner.
        assert (drawn[(y0 + y1) // 2, (x0 + x1) // 2] == 128).all()
        assert (drawn[y0 + 4 : y0 + 12, x0 + 2 : x0 + 10] != 128).any()
    assert (drawn[5, 5] == 128).all() and (drawn[175, 120] == 128).all()
    assert not np.array_equal(drawn[30, 60], drawn[20, 180])  # each box its own colour


def test_person_boxes_of_the_middle_keyframe_are_numbered_left_to_right_and_listed():
    record = Record(kind="clip", source_path="x", meta={"detections": [
        {"keyframe": 1, "label": "person", "box": [130, 10, 200, 170], "score": 0.9},
        {"keyframe": 0, "label": "person", "box": [0, 0, 50, 50], "score": 0.9},
        {"keyframe": 1, "label": "guitar", "box": [60, 60, 120, 120], "score": 0.8},
        {"keyframe": 1, "label": "person", "box": [12, 15, 70, 175], "score": 0.7},
    ]})
    priors = person_boxes(record, keyframe=1)
    assert [p["box"] for p in priors] == [[12, 15, 70, 175], [130, 10, 200, 170]]
    assert [p["index"] for p in priors] == [1, 2] and {p["keyframe"] for p in priors} == {1}
    listing = boxes_prompt([[12, 15, 70, 175], [130, 10, 200, 170]])
    assert "box 1: [12, 15, 70, 175]\nbox 2: [130, 10, 200, 170]" in listing
    assert "null" in boxes_prompt([])


# ------------------------------------------------------------------------------ the stage, end to end
def make_stage(model_dir: Path, *overrides: str) -> VlmEntityExtractor:
    config = build_config(overrides=[f"entities.model.path={model_dir}", "entities.max_new_tokens=16",
                                     f"caption.max_pixels={112 * 112}", *overrides])
    stage = VlmEntityExtractor(config)
    stage.setup()
    return stage


class GenerateCounter:
    """Instrumentation, not a mock: calls the model's real `generate` and records each call's prompts."""

    def __init__(self, model, tokenizer):
        self.inner, self.tokenizer = model.generate, tokenizer
        self.prompts: list[list[str]] = []
        model.generate = self

    def __call__(self, **kwargs):
        self.prompts.append(self.tokenizer.batch_decode(kwargs["input_ids"], skip_special_tokens=False))
        return self.inner(**kwargs)


def clip_with_two_people(key: str = "two") -> Record:
    frame = cv2.resize(data.astronaut(), (224, 168), interpolation=cv2.INTER_AREA)
    record = Record(kind="clip", source_path=f"{key}.mp4", key=key, meta={
        "caption": {"text": CAPTION, "source": "metadata"},
        "keyframes": [{"at": 0.05, "frame": 3}, {"at": 0.5, "frame": 30}, {"at": 0.95, "frame": 57}],
        "detections": [{"keyframe": 1, "label": "person", "box": [120, 10, 200, 160], "score": 0.9},
                       {"keyframe": 1, "label": "person", "box": [10, 12, 90, 165], "score": 0.8}],
    })
    record.blobs["keyframes"] = np.stack([frame, frame[:, ::-1], frame])
    return record


def test_gibberish_is_reasked_max_retries_times_then_an_error_on_that_clip_only(tiny_qwen):
    stage = make_stage(tiny_qwen, "entities.max_retries=2")
    counter = GenerateCounter(stage.vlm.model, stage.vlm.processor.tokenizer)
    no_caption = Record(kind="clip", source_path="n.mp4", key="n", meta={"caption": None})
    out = run_stage(stage, [clip_with_two_people(), no_caption])
    assert len(counter.prompts) == 3  # the first answer and max_retries re-asks
    assert out[0].errors[0]["stage"] == "entities" and out[0].errors[0]["reason"] == "entities_malformed"
    assert "after 3 answers" in out[0].errors[0]["message"]
    assert out[1].alive and out[1].meta["entities"] == [] and "no caption" in out[1].meta["warnings"][0]["message"]
    first, last = counter.prompts[0][0], counter.prompts[-1][0]
    # The prompt lists the middle keyframe's person boxes, left to right, in pixels of the image the model sees:
    # the 224x168 keyframe is resized to 112x84 for the 112*112 pixel budget, and so are the boxes.
    assert "box 1: [5, 6, 45, 82]\nbox 2: [60, 5, 100, 80]" in first and CAPTION in first
    assert first.count("<|vision_start|>") == 1
    # Each re-ask carries the bad answers and what was wrong, so greedy decoding does not just repeat itself.
    assert last.startswith(first.rsplit("<|im_start|>assistant", 1)[0]) and last.count("That answer is not valid") == 2

    stage = make_stage(tiny_qwen, "entities.max_retries=0")
    counter = GenerateCounter(stage.vlm.model, stage.vlm.processor.tokenizer)
    out = run_stage(stage, [clip_with_two_people()])
    assert len(counter.prompts) == 1 and out[0].errors[0]["reason"] == "entities_malformed"


def test_a_batch_is_asked_in_one_call_and_a_valid_reask_is_used(tiny_qwen, taxonomy):
    stage = make_stage(tiny_qwen, "entities.max_retries=2")
    real_generate = stage.vlm.generate
    calls = []

    # The tiny model's random weights cannot write JSON, so the replies are scripted: the real processor and model
    # still run on each call (so the batching is real); only their decoded gibberish is replaced by what a trained
    # model could say: round 1 one fenced valid answer and one wrong answer, round 2 a valid answer.
    def scripted(chats, images, max_new_tokens):
        real_generate(chats, images, max_new_tokens)
        calls.append(len(chats))
        if len(calls) == 1:
            return ["```json\n" + json.dumps(GOOD) + "\n```", '{"subjects": [{"word": "dog"}]}']
        return [json.dumps({**GOOD, "subjects": GOOD["subjects"][::-1]})]

    stage.vlm.generate = scripted
    out = run_stage(stage, [clip_with_two_people("a"), clip_with_two_people("b")])
    assert calls == [2, 1] and all(r.alive for r in out)
    a, b = (r.meta["entities"] for r in out)
    assert [e["kind"] for e in a] == ["subject", "subject", "object", "background"]
    # Box priors are the detections themselves, in keyframe pixels: box 1 is the left person.
    assert a[0]["box_prior"] == {"index": 1, "keyframe": 1, "box": [10.0, 12.0, 90.0, 165.0]}
    assert a[1]["box_prior"]["box"] == [120.0, 10.0, 200.0, 160.0]
    assert b == a  # the re-asked clip's answer lists the men in the other order: each keeps his mention
    assert "valid JSON at answer 1" in out[0].meta["provenance"]["entities"]
    assert "valid JSON at answer 2" in out[1].meta["provenance"]["entities"]
