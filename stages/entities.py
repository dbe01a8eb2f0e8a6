"""Entity extraction from the clip caption: subjects (with attributes), objects and background.

This is the taxonomy path (no VLM configured): caption words are matched against the subject taxonomy, as
Kaleido does to find candidate subjects. Each entity keeps the exact word tag of the caption. A subject's
attributes are the attribute words in its part of the caption (from its mention to the next entity mention),
the text-only stand-in for LumosX's box-prior binding that the Qwen2.5-VL path does.
"""

from __future__ import annotations

from pipeline.core.record import Record
from pipeline.core.stage import Stage
from taxonomies.entities import TAXONOMY_PROVENANCE, extract_entities


class EntityExtractor(Stage):
    name = "entities"

    section = "entities"  # resources come from config.entities.resources

    def setup(self) -> None:
        from taxonomies.matcher import Taxonomy

        self.taxonomy = Taxonomy.load(self.config.entities.taxonomy)

    def process(self, records: list[Record]) -> list[Record]:
        if not hasattr(self, "taxonomy"):
            self.setup()
        for record in records:
            caption = (record.meta.get("caption") or {}).get("text")
            if not caption:
                record.meta["entities"] = []
                record.warn(self.name, "no caption, so no entities (configure captioning or give captions in metadata)")
                continue
            record.meta["entities"] = extract_entities(caption, self.taxonomy)
        return records

    def provenance_of(self, record: Record) -> str | None:
        return TAXONOMY_PROVENANCE if (record.meta.get("caption") or {}).get("text") else None
