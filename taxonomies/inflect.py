"""A small, explicit English pluralizer and singularizer for taxonomy nouns.

Rules plus lists of exceptions, written out here rather than pulled from an NLP package: the taxonomy needs plurals
of a few thousand concrete nouns, and every irregular one it uses is listed below where a reviewer can see it.
"""

from __future__ import annotations

import re

# Singular -> plural forms; the first form is the usual one.
IRREGULAR: dict[str, tuple[str, ...]] = {
    "man": ("men",),
    "woman": ("women",),
    "child": ("children",),
    "person": ("people", "persons"),
    "mouse": ("mice",),
    "goose": ("geese",),
    "louse": ("lice",),
    "foot": ("feet",),
    "tooth": ("teeth",),
    "ox": ("oxen",),
    "fish": ("fish", "fishes"),
    "shrimp": ("shrimp", "shrimps"),
    "squid": ("squid", "squids"),
    "elk": ("elk", "elks"),
    "buffalo": ("buffalo", "buffaloes", "buffalos"),
    "knife": ("knives",),
    "wife": ("wives",),
    "life": ("lives",),
    "leaf": ("leaves",),
    "loaf": ("loaves",),
    "wolf": ("wolves",),
    "calf": ("calves",),
    "half": ("halves",),
    "shelf": ("shelves",),
    "thief": ("thieves",),
    "elf": ("elves",),
    "sheaf": ("sheaves",),
    "scarf": ("scarves", "scarfs"),
    "hoof": ("hooves", "hoofs"),
    "dwarf": ("dwarfs", "dwarves"),
    "cactus": ("cacti", "cactuses"),
    "fungus": ("fungi", "funguses"),
    "octopus": ("octopuses", "octopi"),
    "hippopotamus": ("hippopotamuses", "hippopotami"),
    "lens": ("lenses",),
    "bus": ("buses", "busses"),
    "gas": ("gases",),
    "atlas": ("atlases",),
    "canvas": ("canvases",),
    "iris": ("irises",),
    "walrus": ("walruses",),
    "platypus": ("platypuses",),
    "rhinoceros": ("rhinoceroses", "rhinoceros"),
    "potato": ("potatoes",),
    "tomato": ("tomatoes",),
    "hero": ("heroes",),
    "echo": ("echoes",),
    "torpedo": ("torpedoes",),
    "domino": ("dominoes",),
    "mosquito": ("mosquitoes", "mosquitos"),
    "volcano": ("volcanoes", "volcanos"),
    "mango": ("mangoes", "mangos"),
    "flamingo": ("flamingos", "flamingoes"),
    "tornado": ("tornadoes", "tornados"),
    "quiz": ("quizzes",),
    "passerby": ("passersby",),
    "paparazzo": ("paparazzi",),
    "oasis": ("oases",),
}

# Words whose plural is the word itself.
INVARIANT = frozenset(
    {
        "sheep", "deer", "moose", "bison", "salmon", "trout", "cod", "tuna", "swine", "cattle", "aircraft",
        "spacecraft", "hovercraft", "watercraft", "offspring", "series", "species", "chassis", "corps", "people",
        "police", "news", "sushi", "sashimi", "dice",
    }
)

# Nouns that only exist as plurals: singularize must leave them alone ("glasses" is not a drinking glass).
PLURAL_ONLY = frozenset(
    {
        "glasses", "sunglasses", "eyeglasses", "spectacles", "goggles", "binoculars", "jeans", "shorts", "pants",
        "trousers", "leggings", "tights", "sweatpants", "pajamas", "pyjamas", "overalls", "dungarees", "clothes",
        "scissors", "pliers", "tongs", "shears", "headphones", "earphones", "earbuds", "stairs", "suspenders",
        "chinos", "slacks", "capris", "culottes", "bleachers", "fries", "nachos", "crisps", "sweets", "cornrows",
        "dreadlocks", "bangs", "pigtails", "blinds", "drapes", "woods", "badlands", "ruins", "bagpipes",
    }
)

# -man/-woman/-child/-mouse/-goose compounds inflect like their last part ("cameramen"), except these.
_COMPOUND_SUFFIXES = ("woman", "man", "child", "mouse", "goose")
_NOT_COMPOUNDS = frozenset(
    {"human", "german", "ottoman", "shaman", "caiman", "talisman", "doberman", "roman", "walkman", "mongoose"}
)
# Singular nouns that merely end in -men.
_MEN_NOUNS = frozenset({"specimen", "abdomen", "omen", "amen", "semen", "stamen", "regimen", "acumen", "ramen"})

# Singular nouns whose plural ends like a regular plural of some other stem ("hoodies" is not "hoody" + s).
_IE_NOUNS = frozenset(
    {
        "cookie", "movie", "zombie", "pie", "tie", "necktie", "bowtie", "brownie", "hoodie", "beanie", "selfie",
        "smoothie", "rookie", "onesie", "collie", "yorkie", "budgie", "birdie", "genie", "prairie", "pixie",
        "goalie", "hippie", "magpie", "veggie", "walkie", "auntie", "scrunchie", "plushie", "lingerie", "calorie",
        "kiddie", "sweetie", "barbie", "bootie", "foodie", "newbie", "techie", "talkie", "eyrie", "brie", "hoagie",
        "sheltie", "cowrie", "kelpie",
    }
)
_E_NOUNS = frozenset(
    {
        "axe", "pickaxe", "mustache", "moustache", "quiche", "niche", "cache", "avalanche", "creche", "cliche",
        "ache", "headache", "croquembouche", "douche",
    }
)
# Singular nouns that end in s; compounds of the last two ("minibus", "stegosaurus") count too.
_S_NOUNS = frozenset(
    {
        "bus", "gas", "lens", "iris", "atlas", "canvas", "walrus", "cactus", "octopus", "platypus", "hippopotamus",
        "rhinoceros", "virus", "lotus", "hummus", "asparagus", "citrus", "hibiscus", "circus", "campus", "oasis",
        "mantis", "metropolis", "tennis", "borealis", "cosmos", "thermos", "chaos", "bonus", "census", "status",
        "apparatus", "fungus", "albatross", "ibis", "pelvis", "abacus", "eucalyptus", "crocus",
    }
)
_S_SUFFIXES = ("bus", "saurus")

_REVERSE_IRREGULAR: dict[str, str] = {}
for _singular, _plurals in IRREGULAR.items():
    for _plural in _plurals:
        _REVERSE_IRREGULAR.setdefault(_plural, _singular)

_WORD_SPLIT = re.compile(r"([ -])")


def plural_forms(phrase: str) -> tuple[str, ...]:
    """The plural spellings of a lowercase noun phrase, usual one first; () when it already reads as plural.

    The head noun is inflected: the word before the first " of " ("cups of coffee"), otherwise the last word
    ("golden retrievers", "t-shirts").
    """
    head_end = phrase.find(" of ")
    if head_end < 0:
        head_end = len(phrase)
    parts = _WORD_SPLIT.split(phrase[:head_end])
    head, before, after = parts[-1], "".join(parts[:-1]), phrase[head_end:]
    return tuple(f"{before}{form}{after}" for form in _plural_words(head) if form != head)


def pluralize(phrase: str) -> str:
    """The usual plural of a lowercase noun phrase (the phrase itself when it is invariant or already plural)."""
    forms = plural_forms(phrase)
    return forms[0] if forms else phrase


def _plural_words(word: str) -> tuple[str, ...]:
    if word in IRREGULAR:
        return IRREGULAR[word]
    if word in INVARIANT or word in PLURAL_ONLY:
        return (word,)
    for suffix in _COMPOUND_SUFFIXES:
        if word.endswith(suffix) and word != suffix and word not in _NOT_COMPOUNDS:
            return tuple(word[: -len(suffix)] + form for form in IRREGULAR[suffix])
    if word.endswith("s"):
        # -ss/-us/-is/-as/-os are singular (dress, walrus, iris); any other final s reads as a plural already.
        return (word + "es",) if word.endswith(("ss", "us", "is", "as", "os")) else (word,)
    if word.endswith(("x", "z", "ch", "sh")):
        return (word + "es",)
    if len(word) > 1 and word.endswith("y") and word[-2] not in "aeiou":
        return (word[:-1] + "ies",)
    return (word + "s",)


def singularize(word: str) -> str:
    """The singular of one lowercase plural noun; a word that is not a regular plural comes back unchanged."""
    if word in _REVERSE_IRREGULAR:
        return _REVERSE_IRREGULAR[word]
    if len(word) < 3 or any(word in s for s in (INVARIANT, PLURAL_ONLY, IRREGULAR, _MEN_NOUNS)):
        return word
    if word in _S_NOUNS or word.endswith(_S_SUFFIXES):
        return word
    for suffix in _COMPOUND_SUFFIXES:
        for plural in IRREGULAR[suffix]:
            stem = word[: -len(plural)]
            if word.endswith(plural) and stem and stem + suffix not in _NOT_COMPOUNDS:
                return stem + suffix
    if word.endswith("es") and (word[:-2] in _S_NOUNS or word[:-2].endswith(_S_SUFFIXES)):
        return word[:-2]
    if word.endswith("ies"):
        return word[:-1] if word[:-1] in _IE_NOUNS else word[:-3] + "y"
    if word.endswith("oes"):
        return word[:-2] if word[:-2] in IRREGULAR else word[:-1]
    if word.endswith(("sses", "xes", "ches", "shes", "tzes")):
        return word[:-1] if word[:-1] in _E_NOUNS else word[:-2]
    if word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word
