"""Caption entities from the taxonomy: the text-only path of entity extraction (subjects with their attribute
words, objects, background), used when no VLM is configured and as the VLM path's starting point."""

from __future__ import annotations

import re

# The provenance line of entities found by taxonomy matching (both entity stages write it).
TAXONOMY_PROVENANCE = "taxonomy match on the caption (no VLM configured)"

WEARABLE = {"clothing", "accessory"}


CLAUSE_BREAK = re.compile(r",|;|\.|\b(?:and|while|as|next to|beside|behind|near|on|against)\b", re.IGNORECASE)


def extract_entities(caption: str, taxonomy) -> list[dict]:
    """Entities of a caption, one per distinct category, in caption order.

    A subject's part of the caption runs from its mention over the clothing and accessory mentions that follow it
    (LumosX: a subject is a face plus its attributes); those mentions become the subject's attributes, not
    separate objects. A subject gets a group id that its face and attributes share.
    """
    matches = taxonomy.match(caption)
    entities: list[dict] = []
    seen: set[str] = set()
    worn: set[int] = set()  # indices of clothing/accessory matches taken as a subject's attributes
    for index, match in enumerate(matches):
        if index in worn or match.category in seen:
            continue  # "a cat ... the cat": one entity; the first mention is its word tag
        seen.add(match.category)
        entity = {
            "id": f"e{len(entities)}",
            "kind": match.kind,
            "word": match.word,
            "category": match.category,
            "taxonomy_group": match.group,
            "span": [match.start, match.end],
        }
        if match.kind == "subject":
            stop = index + 1
            while stop < len(matches) and matches[stop].group in WEARABLE:
                worn.add(stop)
                stop += 1
            end = matches[stop].start if stop < len(matches) else len(caption)
            # After the last thing the subject wears, a clause break starts someone else's words:
            # "a woman in an orange spacesuit and a white rocket" must not give the woman "white".
            worn_end = matches[stop - 1].end if stop - 1 > index else match.end
            tail = CLAUSE_BREAK.search(caption, worn_end, end)
            attributes = taxonomy.attributes_in(caption[match.end : tail.start() if tail else end])
            entity["attributes"] = {k: v for k, v in attributes.items() if v}
            entity["group"] = f"g{sum(1 for e in entities if e['kind'] == 'subject')}"
        entities.append(entity)
    return entities
