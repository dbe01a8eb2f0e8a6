"""The subject taxonomy and its caption matcher.

A taxonomy is a list of categories (a name, a group, a kind and the synonyms that name it in captions) plus a
LumosX-style attribute vocabulary for human subjects. `Taxonomy.load()` validates the YAML and compiles every
synonym, with its plurals, into one regex built from a character trie, so matching a caption is one regex scan.

Matching rules: case-insensitive; whole words only, where a hyphenated compound counts as one word ("cat" matches
neither "category" nor "cat-eye"); plurals and irregular plurals ("puppies", "women", "geese"); a space in a
synonym matches any run of spaces or hyphens ("golden  retriever", "golden-retriever"), a hyphen matches that or
nothing ("t-shirt", "t shirt", "tshirt"); a possessive "'s" is left out of the match ("the dog's ball" -> "dog").
At each position the longest synonym wins ("coffee cup" over "cup"); mentions are reported left to right and never
overlap, and mentions of one category with only spaces between them are one mention ("golden retriever puppy").
The file can also list `ignore` phrases, matched and dropped ("the camera pans" names no camera), and `uninflected`
words, matched only as written ("watch": "a man watches" is a verb).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import yaml

from taxonomies.inflect import plural_forms, singularize

DEFAULT_PATH = Path(__file__).with_name("subjects.yaml")

GROUPS = ("human", "animal", "vehicle", "object", "clothing", "accessory", "scene")
KINDS = ("subject", "object", "background")
# Humans are the subjects that get a face and attributes; scenes are backgrounds; everything else is an object.
_KIND_OF_GROUP = {"human": "subject", "scene": "background"}
ATTRIBUTE_LISTS = ("top", "bottom", "accessories", "hairstyle", "footwear", "colors")

_TOP_LEVEL_KEYS = ("version", "categories", "attributes", "ignore", "uninflected")
_CATEGORY_KEYS = ("name", "group", "kind", "synonyms")
# Lowercase ASCII words separated by one space or hyphen; apostrophes allowed inside words ("bird's-eye view").
_PHRASE = re.compile(r"[a-z0-9][a-z0-9']*(?:[ -][a-z0-9][a-z0-9']*)*")
_UNITS = {" ": r"[\s-]+", "-": r"[\s-]*", "'": r"['’]?"}
_NOT_KEY = re.compile(r"[\s\-'’]+")
_POSSESSIVE = re.compile(r"['’]s?$")
_ADJACENT = re.compile(r"[\s-]+")

T = TypeVar("T")


@dataclass(frozen=True)
class Category:
    """A subject category: `kind` is subject (humans), object, or background (scenes); synonyms as listed."""

    name: str
    group: str
    kind: str
    synonyms: tuple[str, ...]


@dataclass(frozen=True)
class Match:
    """One mention of a category in a caption; `word` is `caption[start:end]` exactly as written."""

    category: str
    group: str
    kind: str
    word: str
    start: int
    end: int


def phrase_key(text: str) -> str:
    """What two spellings of one phrase share: lowercase, without spaces, hyphens and apostrophes."""
    return _NOT_KEY.sub("", text).lower()


class _PhraseIndex(Generic[T]):
    """Finds phrases in text with one compiled regex; each phrase key maps to a value (None: match and drop)."""

    def __init__(self, forms: Mapping[str, T | None]):
        # forms: surface spelling -> value; spellings sharing a key must share a value (the caller checks).
        self._values = {phrase_key(form): value for form, value in forms.items()}
        trie: dict = {}
        for form in forms:
            node = trie
            for char in form:
                node = node.setdefault(char, {})
            node[""] = True
        # Lookarounds make a match a whole word and keep it out of hyphenated compounds ("man-made", "sky-blue").
        self._regex = re.compile(rf"(?<!\w)(?<!\w-)(?:{_trie_pattern(trie)})(?!\w)(?!-\w)", re.IGNORECASE)

    def lookup(self, text: str) -> tuple[bool, T | None]:
        """(known, value) for a phrase spelled any way that shares its key."""
        key = phrase_key(text)
        return key in self._values, self._values.get(key)

    def finditer(self, text: str) -> Iterator[tuple[re.Match, T]]:
        for m in self._regex.finditer(text):
            value = self._values[phrase_key(m.group())]
            if value is not None:
                yield m, value


def _trie_pattern(node: dict) -> str:
    branches = [
        _UNITS.get(char, re.escape(char)) + _trie_pattern(child) for char, child in sorted(node.items()) if char
    ]
    if not branches:
        return ""
    body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
    # A greedy optional tail tries the longer synonym first and backs off to this one: longest match wins.
    return f"(?:{body})?" if "" in node else body


class Taxonomy:
    """Subject categories with their synonyms, the attribute vocabulary, and the compiled matcher over both."""

    def __init__(
        self,
        categories: Iterable[Category],
        attributes: Mapping[str, Sequence[str]],
        ignore: Sequence[str] = (),
        uninflected: Sequence[str] = (),
        source: str = "<taxonomy>",
    ):
        """Validate and compile. `ignore`: phrases that contain a synonym but name no subject ("the camera pans");
        they are matched and dropped. `uninflected`: synonyms matched only as written, because their plural
        reads as a verb in captions ("a man watches"). Raises ValueError naming `source` and the bad entry."""
        self.source = str(source)
        self.categories: dict[str, Category] = {}
        for category in categories:
            self._check_category(category)
            self.categories[category.name] = category
        self.attributes: dict[str, tuple[str, ...]] = {}
        for list_name, words in attributes.items():
            self.attributes[list_name] = self._check_words(f"attributes.{list_name}", words)
        missing = [name for name in ATTRIBUTE_LISTS if name not in self.attributes]
        if missing:
            raise ValueError(f"{self.source}: attributes: missing list(s) {missing}; required: {list(ATTRIBUTE_LISTS)}")
        self.ignore = self._check_words("ignore", ignore, allow_empty=True)
        self.uninflected = self._check_words("uninflected", uninflected, allow_empty=True)

        self._index = _PhraseIndex(self._surface_forms())
        self._attribute_index = {
            list_name: _PhraseIndex(self._attribute_forms(words, set(self.uninflected)))
            for list_name, words in self.attributes.items()
        }

    @classmethod
    def load(cls, path: str | Path | None = None) -> Taxonomy:
        """Read a taxonomy YAML file; None reads the bundled `taxonomies/subjects.yaml`."""
        path = Path(path) if path is not None else DEFAULT_PATH
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
        if not isinstance(data, dict):
            # ValueError throughout: a file with bad content, as every other check here (callers catch ValueError)
            raise ValueError(f"{path}: expected a mapping with keys {list(_TOP_LEVEL_KEYS)}")  # noqa: TRY004
        unknown = sorted(set(data) - set(_TOP_LEVEL_KEYS))
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; allowed: {list(_TOP_LEVEL_KEYS)}")
        if data.get("version") != 1:
            raise ValueError(f"{path}: version must be 1, got {data.get('version')!r}")
        entries = data.get("categories")
        if not isinstance(entries, list) or not entries:
            raise ValueError(f"{path}: categories must be a non-empty list")
        attributes = data.get("attributes")
        if not isinstance(attributes, dict):
            raise ValueError(f"{path}: attributes must be a mapping of list name -> words")  # noqa: TRY004
        categories = []
        for i, entry in enumerate(entries):
            where = f"{path}: categories[{i}]"
            if not isinstance(entry, dict):
                raise ValueError(  # noqa: TRY004
                    f"{where}: expected a mapping with keys {list(_CATEGORY_KEYS)}, got {entry!r}")
            where += f" ({entry.get('name')!r})"
            unknown = sorted(set(entry) - set(_CATEGORY_KEYS))
            missing = [key for key in _CATEGORY_KEYS if key not in entry]
            if unknown or missing:
                raise ValueError(f"{where}: unknown key(s) {unknown}, missing key(s) {missing}")
            synonyms = entry["synonyms"]
            if not isinstance(synonyms, list) or not synonyms:
                raise ValueError(f"{where}: synonyms must be a non-empty list, got {synonyms!r}")
            categories.append(Category(entry["name"], entry["group"], entry["kind"], tuple(synonyms)))
        return cls(
            categories, attributes, data.get("ignore") or (), data.get("uninflected") or (), source=str(path)
        )

    def match(self, text: str) -> list[Match]:
        """Every mention of a category in `text`, left to right, non-overlapping, longest synonym first."""
        found: list[Match] = []
        for m, c in self._index.finditer(text):
            start = m.start()
            if found and found[-1].category == c.name and _ADJACENT.fullmatch(text[found[-1].end : start]):
                # "tabby kitten" is one cat, not two: the first word only qualifies the second.
                start = found.pop().start
            found.append(Match(c.name, c.group, c.kind, text[start : m.end()], start, m.end()))
        return found

    def category_of(self, word: str) -> Category | None:
        """The category a word or phrase names ("Puppies", "golden-retriever's"), or None."""
        text = _POSSESSIVE.sub("", word.strip().lower())
        known, category = self._index.lookup(text)
        if not known:
            # A plural the matcher does not generate itself, e.g. of an uninflected synonym ("watches").
            tokens = re.split(r"[\s-]+", text)
            _, category = self._index.lookup(" ".join(tokens[:-1] + [singularize(tokens[-1])]))
        return category

    def attributes_in(self, text: str) -> dict[str, list[str]]:
        """Per attribute list, the vocabulary words found in `text` (as listed, in order of appearance, once each).

        Every list is a key, empty when nothing was found; lists are matched independently, so "gold watch" gives
        a colour and an accessory."""
        found: dict[str, list[str]] = {}
        for list_name, index in self._attribute_index.items():
            words = found[list_name] = []
            for _, word in index.finditer(text):
                if word not in words:
                    words.append(word)
        return found

    def _check_category(self, c: Category) -> None:
        where = f"{self.source}: category {c.name!r}"
        if not isinstance(c.name, str) or not _PHRASE.fullmatch(c.name):
            raise ValueError(f"{where}: name must be a lowercase phrase")
        if c.name in self.categories:
            raise ValueError(f"{where}: defined twice")
        if c.group not in GROUPS:
            raise ValueError(f"{where}: unknown group {c.group!r}; allowed: {list(GROUPS)}")
        if c.kind not in KINDS:
            raise ValueError(f"{where}: unknown kind {c.kind!r}; allowed: {list(KINDS)}")
        expected = _KIND_OF_GROUP.get(c.group, "object")
        if c.kind != expected:
            raise ValueError(f"{where}: group {c.group!r} needs kind {expected!r}, got {c.kind!r}")
        synonyms = self._check_words(f"category {c.name!r}: synonyms", c.synonyms)
        if phrase_key(c.name) not in {phrase_key(s) for s in synonyms}:
            raise ValueError(f"{where}: its name must also be one of its synonyms")

    def _check_words(self, where: str, words, allow_empty: bool = False) -> tuple[str, ...]:
        where = f"{self.source}: {where}"
        if isinstance(words, str) or not isinstance(words, (list, tuple)) or (not words and not allow_empty):
            raise ValueError(f"{where}: expected a non-empty list of phrases, got {words!r}")
        seen: dict[str, str] = {}
        for word in words:
            if not isinstance(word, str) or not _PHRASE.fullmatch(word):
                raise ValueError(
                    f"{where}: {word!r} is not a lowercase phrase (words of a-z, 0-9 and ', one space or hyphen apart)"
                )
            key = phrase_key(word)
            if key in seen:
                raise ValueError(f"{where}: {word!r} is listed twice (also as {seen[key]!r})")
            seen[key] = word
        return tuple(words)

    def _surface_forms(self) -> dict[str, Category | None]:
        """Every spelling the matcher looks for, mapped to its category; a clash between categories is an error."""
        owner: dict[str, tuple[Category, str]] = {}
        forms: dict[str, Category | None] = {}

        def claim(form: str, category: Category, origin: str) -> None:
            key = phrase_key(form)
            if key in owner and owner[key][0] is not category:
                other, other_origin = owner[key]
                raise ValueError(
                    f"{self.source}: synonym {form!r} ({origin}) of category {category.name!r} is also "
                    f"a synonym of category {other.name!r} ({other_origin}); a synonym may name one category only"
                )
            owner.setdefault(key, (category, origin))
            forms[form] = category

        # Listed synonyms first, so a clash is reported against what a person wrote, not a generated plural.
        for category in self.categories.values():
            for synonym in category.synonyms:
                claim(synonym, category, "as listed")
        uninflected = set(self.uninflected)
        vocabulary = {s for c in self.categories.values() for s in c.synonyms}
        vocabulary.update(w for words in self.attributes.values() for w in words)
        if uninflected - vocabulary:
            raise ValueError(
                f"{self.source}: uninflected: {sorted(uninflected - vocabulary)} are neither synonyms nor attributes"
            )
        for category in self.categories.values():
            for synonym in category.synonyms:
                if synonym not in uninflected:
                    for form in plural_forms(synonym):
                        claim(form, category, f"plural of {synonym!r}")
        for phrase in self.ignore:
            if phrase_key(phrase) in owner:
                raise ValueError(
                    f"{self.source}: ignore: {phrase!r} is a synonym of category {owner[phrase_key(phrase)][0].name!r}"
                )
            forms[phrase] = None
        return forms

    @staticmethod
    def _attribute_forms(words: tuple[str, ...], uninflected: set[str]) -> dict[str, str]:
        """Each listed word and its plurals -> the listed word; a spelling that is itself listed keeps its own."""
        listed = {phrase_key(word) for word in words}
        forms = {word: word for word in words}
        for word in words:
            for form in () if word in uninflected else plural_forms(word):
                if phrase_key(form) not in listed:
                    forms.setdefault(form, word)
        return forms
