import json

from pipeline.core.config import build_config
from pipeline.core.record import Record
from pipeline.core.stage import run_stage
from stages.entities import EntityExtractor
from taxonomies.entities import extract_entities
from taxonomies.matcher import Taxonomy


def test_subjects_objects_background_with_word_tags_and_groups():
    caption = "A man in a black leather jacket holds a guitar next to a woman with a red hat on a busy street."
    entities = extract_entities(caption, Taxonomy.load())
    by_category = {e["category"]: e for e in entities}
    man, woman = by_category["man"], by_category["woman"]
    assert (man["kind"], woman["kind"]) == ("subject", "subject")
    assert caption[man["span"][0]:man["span"][1]] == man["word"] == "man"
    # Attributes bind to the subject whose part of the caption names them.
    assert "jacket" in " ".join(man["attributes"].get("top", [])) and "black" in man["attributes"].get("colors", [])
    assert "hat" in " ".join(woman["attributes"].get("accessories", []))
    assert "hat" not in json.dumps(man["attributes"])
    assert man["group"] != woman["group"]
    assert any(e["kind"] == "object" and e["word"] == "guitar" for e in entities)
    assert any(e["kind"] == "background" for e in entities)
    assert [e["id"] for e in entities] == [f"e{i}" for i in range(len(entities))]


def test_attributes_stop_at_the_clause_that_names_the_next_entity():
    caption = "A smiling woman in an orange spacesuit and a white rocket stand on the moon."
    woman = next(e for e in extract_entities(caption, Taxonomy.load()) if e["category"] == "woman")
    assert "orange" in woman["attributes"]["colors"] and "white" not in woman["attributes"]["colors"]


def test_repeated_mentions_make_one_entity():
    entities = extract_entities("A cat sleeps. The cat wakes up and the cats play.", Taxonomy.load())
    assert [e["category"] for e in entities] == ["cat"]


def test_every_demo_caption_yields_a_subject_or_object_and_a_background(demo_corpus):
    stage = EntityExtractor(build_config())
    records = []
    for line in (demo_corpus / "metadata.jsonl").read_text().splitlines():
        for shot in json.loads(line)["shots"]:
            records.append(Record(kind="clip", source_path="x", key=str(len(records)),
                                  meta={"caption": {"text": shot["caption"], "source": "metadata"}}))
    records.append(Record(kind="clip", source_path="x", key="none", meta={"caption": None}))
    out = run_stage(stage, records)
    for record in out[:-1]:
        kinds = {e["kind"] for e in record.meta["entities"]}
        assert kinds & {"subject", "object"} and "background" in kinds, record.meta["caption"]
    assert out[-1].meta["entities"] == [] and out[-1].alive and "no caption" in out[-1].meta["warnings"][0]["message"]
