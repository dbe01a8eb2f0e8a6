"""Subject taxonomy (categories, synonyms, attribute vocabulary) and its matcher (arrives with the entity stages)."""
