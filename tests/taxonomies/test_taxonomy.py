"""The bundled subject taxonomy and its caption matcher: sizes, rules, spans, demo-corpus coverage, bad files."""

from __future__ import annotations

import itertools
import json
import re
from collections import defaultdict
from pathlib import Path

import pytest
import yaml

from pipeline.sources import demo_data
from pipeline.sources.demo_data import build_demo_corpus
from taxonomies.inflect import PLURAL_ONLY, plural_forms, pluralize, singularize
from taxonomies.matcher import DEFAULT_PATH, GROUPS, Taxonomy, phrase_key


@pytest.fixture(scope="module")
def taxonomy() -> Taxonomy:
    return Taxonomy.load()


def words(taxonomy: Taxonomy, text: str) -> list[tuple[str, str]]:
    return [(m.word, m.category) for m in taxonomy.match(text)]


# ---------------------------------------------------------------- the bundled file


def test_sizes_groups_and_kinds(taxonomy):
    categories = taxonomy.categories.values()
    assert len(taxonomy.categories) >= 100
    assert len({s for c in categories for s in c.synonyms}) >= 800
    by_group = defaultdict(list)
    for c in categories:
        by_group[c.group].append(c)
        assert c.kind == {"human": "subject", "scene": "background"}.get(c.group, "object"), c.name
    assert set(by_group) == set(GROUPS)
    assert len(by_group["animal"]) >= 25
    for name in ("man", "woman", "boy", "girl", "baby", "person", "elderly man", "elderly woman", "police officer",
                 "chef", "astronaut", "soldier", "athlete"):
        assert taxonomy.categories[name].kind == "subject"
    for name in ("beach", "street", "kitchen", "forest", "office", "brick wall", "lawn", "night sky", "desert",
                 "snow field"):
        assert taxonomy.categories[name].kind == "background"
    assert set(taxonomy.attributes) >= {"top", "bottom", "accessories", "hairstyle", "footwear", "colors"}
    assert all(len(taxonomy.attributes[name]) >= 15 for name in taxonomy.attributes)


def test_no_spelling_names_two_categories():
    """Recomputed from the raw YAML, independently of the loader's own check: listed synonyms and their plurals."""
    data = yaml.safe_load(DEFAULT_PATH.read_text())
    owners = defaultdict(set)
    for entry in data["categories"]:
        for synonym in entry["synonyms"]:
            owners[phrase_key(synonym)].add(entry["name"])
            if synonym not in data["uninflected"]:
                for form in plural_forms(synonym):
                    owners[phrase_key(form)].add(entry["name"])
    clashes = {key: names for key, names in owners.items() if len(names) > 1}
    assert clashes == {}


def test_every_category_name_is_its_own_synonym(taxonomy):
    for name, category in taxonomy.categories.items():
        assert taxonomy.category_of(name) is category


# ---------------------------------------------------------------- matching rules


def test_longest_phrase_wins(taxonomy):
    assert words(taxonomy, "a coffee cup on a coffee table") == [("coffee cup", "cup"), ("coffee table", "table")]
    assert words(taxonomy, "in front of a red brick wall") == [("brick wall", "brick wall")]
    assert words(taxonomy, "a wall") == [("wall", "wall")]
    assert words(taxonomy, "a hot dog and a dog") == [("hot dog", "sandwich"), ("dog", "dog")]
    assert words(taxonomy, "a german shepherd and a shepherd") == [("german shepherd", "dog"), ("shepherd", "farmer")]
    assert words(taxonomy, "a teddy bear") == [("teddy bear", "teddy bear")]


def test_adjacent_mentions_of_one_category_are_one(taxonomy):
    assert words(taxonomy, "a tabby kitten and a golden retriever puppy") == [
        ("tabby kitten", "cat"),
        ("golden retriever puppy", "dog"),
    ]
    assert words(taxonomy, "a cat, a cat") == [("cat", "cat"), ("cat", "cat")]


def test_whole_words_only(taxonomy):
    assert words(taxonomy, "a category to concatenate scattered catalogues") == []
    assert words(taxonomy, "they appear side by side, and that is that") == []
    # A hyphenated compound is one word: no man in "man-made", no baby in "baby-blue".
    assert words(taxonomy, "a man-made sky-blue cat-eye baby-blue ex-soldier") == []
    assert words(taxonomy, "a sun-drenched beach") == [("beach", "beach")]


@pytest.mark.parametrize(
    "word, category",
    [
        ("dogs", "dog"), ("puppies", "dog"), ("women", "woman"), ("men", "man"), ("children", "child"),
        ("people", "person"), ("knives", "knife"), ("boxes", "box"), ("geese", "goose"), ("mice", "mouse"),
        ("buses", "bus"), ("glasses", "glasses"), ("wine glasses", "drinking glass"), ("cameramen", "photographer"),
        ("shelves", "shelf"), ("babies", "baby"), ("wolves", "wolf"), ("cacti", "plant"), ("humans", "person"),
        ("ottomans", "sofa"), ("cups of coffee", "cup"), ("sheep", "sheep"), ("fish", "fish"), ("fishes", "fish"),
        ("tomatoes", "vegetable"), ("hoodies", "hoodie"), ("dresses", "dress"), ("policewomen", "police officer"),
    ],
)
def test_plurals_and_irregulars(taxonomy, word, category):
    assert words(taxonomy, f"two {word} here") == [(word, category)]


def test_color_words_are_not_fruit_and_verbs_are_not_plurals(taxonomy):
    assert words(taxonomy, "an orange cat in an orange spacesuit eats oranges") == [
        ("cat", "cat"), ("spacesuit", "spacesuit"), ("oranges", "citrus fruit"),
    ]
    # "watch" and "cook" are matched only as written: their -s forms are mostly verbs.
    assert words(taxonomy, "a man watches a cook who cooks; he wears a watch") == [
        ("man", "man"), ("cook", "chef"), ("watch", "watch"),
    ]


def test_hyphen_and_whitespace_variants(taxonomy):
    for text in ("t-shirt", "t shirt", "tshirt", "T-Shirt", "t - shirt"):
        assert words(taxonomy, f"a {text}.") == [(text, "t-shirt")]
    for text in ("golden retriever", "golden  retriever", "golden-retriever", "Golden\nRetriever"):
        assert words(taxonomy, f"a {text}!") == [(text, "dog")]
    # A space in a synonym needs a separator in the text; "goldenretriever" is not a spelling of it.
    assert words(taxonomy, "goldenretriever") == []
    assert words(taxonomy, "a firefighter, a fire fighter") == [("firefighter", "firefighter"),
                                                                 ("fire fighter", "firefighter")]


def test_possessives_leave_the_clitic_out(taxonomy):
    assert words(taxonomy, "the dog's ball and the dogs' bowls") == [
        ("dog", "dog"), ("ball", "ball"), ("dogs", "dog"), ("bowls", "bowl"),
    ]
    assert words(taxonomy, "the cat’s toy, the woman's hat") == [
        ("cat", "cat"), ("toy", "toy"), ("woman", "woman"), ("hat", "hat"),
    ]


def test_spans_are_the_caption_as_written(taxonomy):
    caption = "Two Golden Retrievers chase a Coffee-Cup past an ELDERLY   WOMAN's bicycle on the Brick Wall."
    matches = taxonomy.match(caption)
    assert [m.word for m in matches] == ["Golden Retrievers", "Coffee-Cup", "ELDERLY   WOMAN", "bicycle",
                                         "Brick Wall"]
    for m in matches:
        assert caption[m.start : m.end] == m.word
    assert [m.start for m in matches] == sorted(m.start for m in matches)
    assert all(a.end <= b.start for a, b in itertools.pairwise(matches))
    assert [(m.group, m.kind) for m in matches][2:] == [
        ("human", "subject"), ("vehicle", "object"), ("scene", "background"),
    ]


def test_ignored_phrases_consume_their_words(taxonomy):
    assert words(taxonomy, "The camera pans left over a camera on a tripod") == [
        ("camera", "camera"), ("tripod", "tripod"),
    ]
    assert taxonomy.match("The camera pans left over a camera")[0].start == len("The camera pans left over a ")
    assert words(taxonomy, "a bird's-eye view of a bird, a birds eye view") == [("bird", "bird")]


def test_category_of(taxonomy):
    assert taxonomy.category_of("Puppies").name == "dog"
    assert taxonomy.category_of("golden-retriever's").name == "dog"
    assert taxonomy.category_of("  Coffee  Cup ").name == "cup"
    assert taxonomy.category_of("watches").name == "watch"
    assert taxonomy.category_of("camera pans") is None
    assert taxonomy.category_of("unicorn") is None


def test_attributes_in(taxonomy):
    found = taxonomy.attributes_in("a man in a black leather jacket and blue jeans with a silver watch")
    assert found["top"] == ["leather jacket"]
    assert found["bottom"] == ["jeans"]
    assert found["accessories"] == ["watch"]
    assert found["colors"] == ["black", "blue", "silver"]
    assert found["hairstyle"] == [] and found["footwear"] == []
    found = taxonomy.attributes_in("a red-haired woman with a ponytail, two earrings and white sneakers")
    assert found["hairstyle"] == ["red-haired", "ponytail"]
    assert found["accessories"] == ["earring"] and found["footwear"] == ["sneaker"] and found["colors"] == ["white"]


# ---------------------------------------------------------------- the demo corpus


def test_every_demo_noun_maps_to_its_category(taxonomy):
    """Each subject noun and background phrase the demo corpus writes into captions, checked one by one."""
    expected = {
        "a smiling woman in an orange spacesuit": [("woman", "woman"), ("spacesuit", "spacesuit")],
        "a tabby cat": [("tabby cat", "cat")],
        "a cup of coffee on a red saucer": [("cup of coffee", "cup"), ("saucer", "plate")],
        "a white rocket": [("rocket", "rocket")],
        "a red motorcycle": [("motorcycle", "motorcycle")],
        "a man with a camera on a tripod": [("man", "man"), ("camera", "camera"), ("tripod", "tripod")],
        "in front of a red brick wall": [("brick wall", "brick wall")],
        "on a grassy lawn": [("lawn", "lawn")],
        "on a gravel path": [("gravel path", "path")],
        "in front of rows of old coins on a table": [("rows of old coins", "coin collection"), ("table", "table")],
        "on the grey cratered surface of the moon": [("surface of the moon", "moon surface")],
        "against a night sky with galaxies": [("night sky", "night sky"), ("galaxies", "outer space")],
        "in front of a page of printed text": [("page of printed text", "printed page")],
    }
    # Private tables of the demo builder: a noun added there must be added here (and to the taxonomy).
    phrases = [s.noun for s in demo_data._SUBJECTS.values()] + [b.where for b in demo_data._BACKGROUNDS.values()]
    assert sorted(phrases) == sorted(expected)
    for phrase, found in expected.items():
        assert words(taxonomy, phrase) == found, phrase


@pytest.fixture(scope="module")
def demo_captions(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("demo6")
    build_demo_corpus(root, videos=6)
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    return [shot["caption"] for row in rows for shot in row["shots"]]


@pytest.mark.slow  # builds a 24-video demo corpus
def test_every_demo_caption_has_a_subject_and_a_background(taxonomy, demo_captions):
    assert len(demo_captions) >= 12
    for caption in demo_captions:
        matches = taxonomy.match(caption)
        assert any(m.kind in ("subject", "object") for m in matches), caption
        assert any(m.kind == "background" for m in matches), caption
        # The camera that films ("the camera pans") is not a subject; the one on the tripod is.
        cameras = [m for m in matches if m.category == "camera"]
        assert len(cameras) == caption.count("with a camera"), caption


# ---------------------------------------------------------------- bad files


def _write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _small() -> dict:
    return {
        "version": 1,
        "categories": [
            {"name": "dog", "group": "animal", "kind": "object", "synonyms": ["dog", "puppy"]},
            {"name": "man", "group": "human", "kind": "subject", "synonyms": ["man", "guy"]},
            {"name": "beach", "group": "scene", "kind": "background", "synonyms": ["beach"]},
        ],
        "attributes": {name: ["x"] for name in ("top", "bottom", "accessories", "hairstyle", "footwear", "colors")},
    }


def test_a_small_valid_file_loads_and_matches(tmp_path):
    taxonomy = Taxonomy.load(_write(tmp_path, _small()))
    assert words(taxonomy, "Two guys and their puppies on the beach") == [
        ("guys", "man"), ("puppies", "dog"), ("beach", "beach"),
    ]


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d["categories"][0].update(group="animals"), r"'dog'.*unknown group 'animals'.*'animal'"),
        (lambda d: d["categories"][0].update(kind="thing"), r"'dog'.*unknown kind 'thing'"),
        (lambda d: d["categories"][0].update(kind="subject"), r"'dog'.*group 'animal' needs kind 'object'"),
        (lambda d: d["categories"][0].update(synonyms=[]), r"categories\[0\] \('dog'\).*synonyms must be a non-empty"),
        (lambda d: d["categories"][1]["synonyms"].append("puppy"),
         r"'puppy'.*category 'man'.*also a synonym of category 'dog'"),
        (lambda d: d["categories"][1]["synonyms"].append("puppies"),
         r"'puppies' \(plural of 'puppy'\) of category 'dog' is also a synonym of category 'man'"),
        (lambda d: d["categories"][0]["synonyms"].append("Dog Food"), r"'Dog Food' is not a lowercase phrase"),
        (lambda d: d["categories"][0]["synonyms"].append("dog"), r"'dog' is listed twice"),
        (lambda d: d["categories"][0].update(name="hound"), r"'hound'.*name must also be one of its synonyms"),
        (lambda d: d["categories"][0].update(colour="brown"), r"unknown key\(s\) \['colour'\]"),
        (lambda d: d["attributes"].pop("colors"), r"attributes: missing list\(s\) \['colors'\]"),
        (lambda d: d.update(ignore=["dog"]), r"ignore: 'dog' is a synonym of category 'dog'"),
        (lambda d: d.update(uninflected=["cat"]), r"uninflected: \['cat'\]"),
        (lambda d: d.update(version=2), r"version must be 1"),
        (lambda d: d.update(synonym=[]), r"unknown key\(s\) \['synonym'\]"),
    ],
)
def test_a_bad_file_raises_naming_the_file_and_the_entry(tmp_path, edit, message):
    data = _small()
    edit(data)
    path = _write(tmp_path, data)
    with pytest.raises(ValueError, match=message) as exc:
        Taxonomy.load(path)
    assert str(path) in str(exc.value)


# ---------------------------------------------------------------- the inflector


def test_singularize_undoes_pluralize_over_the_whole_vocabulary(taxonomy):
    vocabulary = {s for c in taxonomy.categories.values() for s in c.synonyms}
    vocabulary.update(w for ws in taxonomy.attributes.values() for w in ws)
    wrong = []
    for phrase in sorted(vocabulary):
        head = re.split(r"[ -]", phrase.split(" of ")[0])[-1]
        for plural in plural_forms(head):
            if plural not in PLURAL_ONLY and singularize(plural) != head:
                wrong.append((head, plural, singularize(plural)))
    assert wrong == []


def test_pluralize_inflects_the_head_noun():
    assert pluralize("cup of coffee") == "cups of coffee"
    assert pluralize("t-shirt") == "t-shirts"
    assert pluralize("loaf of bread") == "loaves of bread"
    assert pluralize("glasses") == "glasses" and pluralize("jeans") == "jeans"
    assert pluralize("human") == "humans" and pluralize("snowman") == "snowmen"
    assert [singularize(w) for w in ("blouses", "houses", "walruses", "minibuses", "axes", "specimens")] == [
        "blouse", "house", "walrus", "minibus", "axe", "specimen",
    ]
