"""The words of the toy world, organised by the role they play in a sentence.

The toy world replaces the pretrained LLM and speech encoder that cannot be fetched
here: `sentences.py` builds short English sentences from these words, `tasks.py`
asks questions about them, espeak-ng reads them aloud for the speech encoder, and a
word-level tokenizer is built from `tasks.all_words()`.

Three rules shape the lists:
- every word belongs to exactly one role, so a sentence can be parsed back from its
  words alone (this is how task answers are computed);
- every word is a real English word that espeak-ng reads one way, and no two words
  of the whole world sound alike ("two" is here, so "to" and "too" are not; "four"
  but not "for"; "red" but not "read"): the encoder must tell them apart from audio;
- everything is lower case without punctuation; text is words joined by single spaces.

Numbers in sentences only quantify plural noun phrases ("three dogs"); a singular
noun phrase starts with "the", "a" or "an", so every noun phrase has a known count.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Noun:
    """A countable noun: its singular and plural forms and its kind."""

    singular: str
    plural: str
    kind: str


@dataclasses.dataclass(frozen=True)
class Verb:
    """A verb in its third-person singular form ("runs") and its base form ("run").

    `objects` names the noun kinds it takes as a direct object (empty for intransitive).
    """

    singular: str
    base: str
    objects: tuple[str, ...] = ()


# Noun kinds. Animals and people can act (sentence subjects); things and food are
# acted on; places only follow a preposition.
ANIMAL = "animal"
PERSON = "person"
THING = "thing"
FOOD = "food"
PLACE = "place"


def _nouns(kind: str, words: str) -> tuple[Noun, ...]:
    """Parses "cat:cats dog:dogs sheep:sheep" into Nouns of one kind."""
    return tuple(Noun(*pair.split(":"), kind=kind) for pair in words.split())


ANIMALS = _nouns(
    ANIMAL,
    "cat:cats dog:dogs fox:foxes cow:cows horse:horses pig:pigs sheep:sheep goat:goats "
    "duck:ducks hen:hens rabbit:rabbits mouse:mice frog:frogs bird:birds owl:owls "
    "lion:lions tiger:tigers bear:bears wolf:wolves deer:deer monkey:monkeys snake:snakes "
    "goose:geese turtle:turtles eagle:eagles zebra:zebras donkey:donkeys camel:camels",
)
PEOPLE = _nouns(
    PERSON,
    "boy:boys girl:girls man:men woman:women child:children farmer:farmers baker:bakers "
    "teacher:teachers king:kings queen:queens",
)
THINGS = _nouns(
    THING,
    "ball:balls box:boxes cup:cups hat:hats book:books stone:stones stick:sticks bell:bells "
    "basket:baskets bag:bags coat:coats key:keys lamp:lamps rope:ropes shoe:shoes sock:socks "
    "spoon:spoons toy:toys drum:drums kite:kites candle:candles bottle:bottles pencil:pencils "
    "ribbon:ribbons blanket:blankets umbrella:umbrellas",
)
FOODS = _nouns(
    FOOD,
    "apple:apples cake:cakes carrot:carrots egg:eggs cookie:cookies pie:pies bone:bones "
    "nut:nuts banana:bananas peach:peaches lemon:lemons potato:potatoes",
)

# Places are singular only; each lists the prepositions that sound natural with it.
PLACES: dict[str, tuple[str, ...]] = {
    "barn": ("in", "near", "behind", "beside"),
    "house": ("in", "near", "behind", "beside"),
    "garden": ("in", "near", "behind"),
    "forest": ("in", "near"),
    "park": ("in", "near", "across"),
    "kitchen": ("in",),
    "field": ("in", "across", "near"),
    "river": ("near", "across", "beside", "in"),
    "lake": ("near", "beside", "in"),
    "hill": ("on", "near", "behind"),
    "bridge": ("on", "under", "near", "across"),
    "beach": ("on", "near"),
    "farm": ("on", "near"),
    "school": ("in", "near", "behind"),
    "castle": ("in", "near", "behind"),
    "market": ("in", "near"),
    "village": ("in", "near"),
    "cave": ("in", "near"),
    "mountain": ("on", "near"),
    "tower": ("in", "near", "behind"),
    "valley": ("in", "across"),
    "island": ("on", "near"),
    "station": ("in", "near", "behind"),
    "tree": ("under", "behind", "near", "in"),
    "table": ("under", "on", "near"),
}
PREPOSITIONS = tuple(sorted({p for preps in PLACES.values() for p in preps}))

COLOURS = ("red", "blue", "green", "yellow", "black", "white", "brown", "grey", "pink", "purple", "orange")

# Adjectives (colours excluded) by the noun kinds they describe.
ANIMATE_ADJECTIVES = (
    "happy",
    "sleepy",
    "lazy",
    "brave",
    "hungry",
    "clever",
    "quiet",
    "tired",
    "young",
    "wild",
    "shy",
    "angry",
    "busy",
    "funny",
    "friendly",
)
THING_ADJECTIVES = ("heavy", "shiny", "soft", "empty", "broken", "round", "clean", "dirty", "new", "wooden")
FOOD_ADJECTIVES = ("fresh", "sweet", "warm", "ripe", "tasty")
PLACE_ADJECTIVES = ("dark", "sunny", "busy", "quiet", "empty", "tall")
SIZE_ADJECTIVES = ("small", "big", "old", "tiny", "little")


def adjectives_for(kind: str) -> tuple[str, ...]:
    """The non-colour adjectives that may describe a noun of `kind`."""
    by_kind = {
        ANIMAL: ANIMATE_ADJECTIVES,
        PERSON: ANIMATE_ADJECTIVES,
        THING: THING_ADJECTIVES,
        FOOD: FOOD_ADJECTIVES,
        PLACE: PLACE_ADJECTIVES,
    }
    return SIZE_ADJECTIVES + by_kind[kind]


def _verbs(objects: tuple[str, ...], words: str) -> tuple[Verb, ...]:
    return tuple(Verb(*pair.split(":"), objects=objects) for pair in words.split())


INTRANSITIVE_VERBS = _verbs(
    (),
    "runs:run sleeps:sleep jumps:jump sits:sit walks:walk swims:swim sings:sing plays:play "
    "rests:rest waits:wait dances:dance digs:dig naps:nap hops:hop",
)
TRANSITIVE_VERBS = (
    _verbs((THING, FOOD), "carries:carry holds:hold drops:drop pushes:push pulls:pull takes:take brings:bring")
    + _verbs((THING,), "kicks:kick")
    + _verbs((FOOD,), "eats:eat")
    + _verbs((ANIMAL, PERSON), "chases:chase follows:follow helps:help feeds:feed hugs:hug visits:visit")
    + _verbs((ANIMAL, PERSON, THING, FOOD), "finds:find watches:watch likes:like hides:hide")
)
VERBS = INTRANSITIVE_VERBS + TRANSITIVE_VERBS

ADVERBS = ("quickly", "slowly", "quietly", "loudly", "happily", "again", "today")

# Singular noun phrases start with an article (count one); plural ones with a number.
ARTICLES = ("the", "a", "an")
CONJUNCTIONS = ("and",)

# Number words, zero first: `NUMBER_WORDS[n]` is the word for n. Sentences use two..five
# as quantities; answers count words (up to ten) and animals (up to three noun
# phrases of five).
NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
    "thirteen",
    "fourteen",
    "fifteen",
)
QUANTITIES = NUMBER_WORDS[2:6]


def number_word(n: int) -> str:
    """The English word for a count 0..15 ("zero", ..., "fifteen")."""
    if not 0 <= n < len(NUMBER_WORDS):
        raise ValueError(f"no number word for {n}")
    return NUMBER_WORDS[n]


NOUNS = ANIMALS + PEOPLE + THINGS + FOODS

# word -> (kind, singular lemma) for every noun form, places included.
NOUN_FORMS: dict[str, tuple[str, str]] = {
    **{form: (n.kind, n.singular) for n in NOUNS for form in (n.singular, n.plural)},
    **{place: (PLACE, place) for place in PLACES},
}
VERB_FORMS: frozenset[str] = frozenset(form for v in VERBS for form in (v.singular, v.base))
ADJECTIVES: frozenset[str] = frozenset(a for kind in (ANIMAL, THING, FOOD, PLACE) for a in adjectives_for(kind))

# Role of every word a sentence can contain.
ROLES: dict[str, frozenset[str]] = {
    "article": frozenset(ARTICLES),
    "quantity": frozenset(QUANTITIES),
    "conjunction": frozenset(CONJUNCTIONS),
    "noun": frozenset(NOUN_FORMS),
    "verb": VERB_FORMS,
    "adjective": ADJECTIVES,
    "colour": frozenset(COLOURS),
    "preposition": frozenset(PREPOSITIONS),
    "adverb": frozenset(ADVERBS),
}


def sentence_words() -> tuple[str, ...]:
    """Every word a generated sentence can contain, sorted."""
    return tuple(sorted(set().union(*ROLES.values())))


def role(word: str) -> str | None:
    """The role of a sentence word ("noun", "verb", ...), None for a word outside the world."""
    for name, words in ROLES.items():
        if word in words:
            return name
    return None
