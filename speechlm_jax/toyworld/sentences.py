"""Sentences of the toy world: a seeded generator, train / held-out splits, and a parser.

The generator follows a small grammar over `vocab.py`:

    sentence     = subject verb_phrase
    subject      = noun_phrase(animal | person) [ "and" noun_phrase(animal | person) ]
    verb_phrase  = intransitive_verb [adverb] [place_phrase]
                 | transitive_verb noun_phrase(the verb's object kinds) [place_phrase]
    place_phrase = preposition noun_phrase(place, singular)
    noun_phrase  = ("the" | "a" | "an") [adjective] [colour] singular_noun
                 | quantity [adjective] [colour] plural_noun        (quantity: two..five)

giving 3 to 10 words ("the dog runs", "a small cat and two brown dogs sleep near the
river"). People take no colour, and the nouns of one sentence are distinct. Sentences
are lower case and unpunctuated, words joined by single spaces.

Which split a sentence belongs to is a property of the sentence itself (a hash of its
text), so the train and held-out sets are disjoint whatever seed or size is asked for;
the seed only decides which sentences of that split are drawn. The encoder's ASR data,
the teacher's text data and the alignment recipes draw from `train`; evaluation draws
from `heldout`.

`parse` recovers the noun phrases, verb and place from the words alone (every word has
one role in the vocabulary), which is how `tasks.py` computes answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import random

from speechlm_jax.toyworld import vocab

SPLITS = ("train", "heldout")
MIN_WORDS = 3
MAX_WORDS = 10
# One sentence in HELDOUT_EVERY (by hash) is held out.
HELDOUT_EVERY = 10


@dataclasses.dataclass(frozen=True)
class NounPhrase:
    """A noun phrase: its words, how many it denotes, the noun's kind and singular lemma."""

    words: tuple[str, ...]
    quantity: int
    kind: str
    lemma: str


@dataclasses.dataclass(frozen=True)
class Parse:
    """The structure of a sentence: noun phrases in order, the first verb, the place lemma."""

    words: tuple[str, ...]
    noun_phrases: tuple[NounPhrase, ...]
    verb: str | None
    place: str | None


def parse(sentence: str) -> Parse:
    """Parses a toy-world sentence by the roles of its words.

    A noun phrase runs from an article or quantity to the next noun; its quantity is 1
    for an article, the number for a quantity word. Words outside the vocabulary are
    kept in `words` and otherwise ignored.
    """
    words = tuple(sentence.split())
    phrases: list[NounPhrase] = []
    start, quantity = None, 1
    verb = None
    for i, word in enumerate(words):
        role = vocab.role(word)
        if role == "article":
            start, quantity = i, 1
        elif role == "quantity":
            start, quantity = i, vocab.NUMBER_WORDS.index(word)
        elif role == "noun":
            kind, lemma = vocab.NOUN_FORMS[word]
            first = i if start is None else start
            phrases.append(NounPhrase(words[first : i + 1], quantity, kind, lemma))
            start, quantity = None, 1
        elif role == "verb" and verb is None:
            verb = word
    place = next((p.lemma for p in phrases if p.kind == vocab.PLACE), None)
    return Parse(words, tuple(phrases), verb, place)


def split_of(sentence: str) -> str:
    """ "train" or "heldout": a stable hash of the sentence text decides."""
    digest = hashlib.blake2b(sentence.encode("utf-8"), digest_size=8).digest()
    return "heldout" if int.from_bytes(digest, "big") % HELDOUT_EVERY == 0 else "train"


def _with_article(article: str, words: list[str]) -> list[str]:
    if article == "a" and words[0][0] in "aeiou":
        article = "an"
    return [article, *words]


def _noun_phrase(rng: random.Random, noun: vocab.Noun, *, plural: bool) -> list[str]:
    modifiers = []
    if rng.random() < 0.35:
        modifiers.append(rng.choice(vocab.adjectives_for(noun.kind)))
    # People are not coloured ("a green boy" is not a sentence anyone says).
    if noun.kind != vocab.PERSON and rng.random() < 0.4:
        modifiers.append(rng.choice(vocab.COLOURS))
    if plural:
        return [rng.choice(vocab.QUANTITIES), *modifiers, noun.plural]
    return _with_article(rng.choice(("the", "a")), [*modifiers, noun.singular])


def _place_phrase(rng: random.Random) -> list[str]:
    place = rng.choice(sorted(vocab.PLACES))
    modifiers = []
    if rng.random() < 0.3:
        modifiers.append(rng.choice(vocab.adjectives_for(vocab.PLACE)))
    if rng.random() < 0.3:
        modifiers.append(rng.choice(vocab.COLOURS))
    return [rng.choice(vocab.PLACES[place]), *_with_article(rng.choice(("the", "a")), [*modifiers, place])]


def _pick_noun(rng: random.Random, kinds: tuple[str, ...], used: set[str]) -> vocab.Noun:
    """A noun of one of `kinds` whose lemma the sentence has not used yet."""
    kind = rng.choice(kinds)
    noun = rng.choice([n for n in vocab.NOUNS if n.kind == kind and n.singular not in used])
    used.add(noun.singular)
    return noun


def generate(rng: random.Random) -> str:
    """One sentence of 3..10 words drawn from the grammar (redrawn until it fits)."""
    while True:
        used: set[str] = set()
        # Three animal subjects to one person, so "how many animals" is rarely zero.
        actors = (vocab.ANIMAL, vocab.ANIMAL, vocab.ANIMAL, vocab.PERSON)
        n_subjects = 2 if rng.random() < 0.25 else 1
        words: list[str] = []
        plural = n_subjects > 1
        for k in range(n_subjects):
            is_plural = rng.random() < 0.35
            plural = plural or is_plural
            if k:
                words.append("and")
            words += _noun_phrase(rng, _pick_noun(rng, actors, used), plural=is_plural)
        if rng.random() < 0.45:
            verb = rng.choice(vocab.INTRANSITIVE_VERBS)
            words.append(verb.base if plural else verb.singular)
            if rng.random() < 0.3:
                words.append(rng.choice(vocab.ADVERBS))
            place_p = 0.6
        else:
            verb = rng.choice(vocab.TRANSITIVE_VERBS)
            words.append(verb.base if plural else verb.singular)
            words += _noun_phrase(rng, _pick_noun(rng, verb.objects, used), plural=rng.random() < 0.35)
            place_p = 0.4
        if rng.random() < place_p:
            words += _place_phrase(rng)
        if MIN_WORDS <= len(words) <= MAX_WORDS:
            return " ".join(words)


def sentences(split: str, n: int, seed: int = 0) -> list[str]:
    """`n` distinct sentences of `split` ("train" or "heldout"), deterministic in `seed`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    out: list[str] = []
    # The grammar has millions of sentences; the cap only guards against an absurd n.
    for _ in range(100 * n + 10_000):
        if len(out) == n:
            break
        sentence = generate(rng)
        if sentence not in seen and split_of(sentence) == split:
            seen.add(sentence)
            out.append(sentence)
    if len(out) < n:
        raise ValueError(f"could not draw {n} distinct {split} sentences")
    return out
