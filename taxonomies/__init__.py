"""Subject taxonomy: the categories captions name, their synonyms, and the attribute vocabulary for humans.

`subjects.yaml` holds the data; `matcher.Taxonomy` loads and validates it and finds category mentions and attribute
words in captions; `inflect` is the small pluralizer the matcher uses to match "puppies" and "geese".
"""
