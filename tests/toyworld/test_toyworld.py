"""The toy world's text half: vocabulary, sentence splits, tasks and their answers."""

import itertools
import json
import re
import subprocess
import sys

import pytest
from transformers import AutoTokenizer

from speechlm_jax.data.tasks import TASKS, TextTask
from speechlm_jax.data.tokenizer import build_word_tokenizer
from speechlm_jax.toyworld import sentences as toy_sentences
from speechlm_jax.toyworld import tasks as toy_tasks
from speechlm_jax.toyworld import vocab

# Words espeak-ng reads identically (or nearly so): at most one of each group may exist.
HOMOPHONES = (
    ("two", "to", "too"),
    ("four", "for", "fore"),
    ("eight", "ate"),
    ("one", "won"),
    ("red", "read"),
    ("blue", "blew"),
    ("sea", "see"),
    ("no", "know"),
    ("none", "nun"),
    ("new", "knew"),
    ("there", "their"),
    ("here", "hear"),
    ("right", "write"),
    ("by", "buy", "bye"),
    ("deer", "dear"),
    ("bear", "bare"),
    ("hare", "hair"),
    ("whole", "hole"),
    ("which", "witch"),
    ("where", "wear"),
    ("road", "rode"),
    ("meat", "meet"),
    ("tail", "tale"),
    ("son", "sun"),
    ("pear", "pair"),
    ("plain", "plane"),
    ("horse", "hoarse"),
    ("main", "mane"),
    ("be", "bee"),
    ("in", "inn"),
    ("or", "oar"),
    ("some", "sum"),
    ("not", "knot"),
    ("night", "knight"),
    ("wait", "weight"),
    ("beach", "beech"),
    ("flower", "flour"),
    ("whale", "wail"),
    ("ant", "aunt"),
    ("peace", "piece"),
    ("so", "sew"),
    ("wood", "would"),
    ("do", "dew", "due"),
    ("grey", "gray"),
    ("colour", "color"),
    ("paws", "pause"),
    ("berry", "bury"),
    ("key", "quay"),
    ("nose", "knows"),
    ("week", "weak"),
    ("hour", "our"),
)

# espeak-ng's own phonemizer, run in a child process so its global state never meets the
# TTS module's in this one. Reads a JSON word list on stdin, writes {word: IPA}.
PHONEMIZE = r"""
import ctypes, json, sys
import espeakng_loader
lib = ctypes.cdll.LoadLibrary(espeakng_loader.get_library_path())
lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(), 0)  # synchronous, no audio
lib.espeak_SetVoiceByName(b"en-us")
lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
out = {}
for word in json.load(sys.stdin):
    text = ctypes.create_string_buffer(word.encode())
    ptr = ctypes.c_void_p(ctypes.addressof(text))
    out[word] = lib.espeak_TextToPhonemes(ctypes.byref(ptr), 1, 2).decode()  # UTF-8 in, IPA out
print(json.dumps(out))
"""

# Hand-written sentences and the answer of every task.
S1 = "the red fox runs near the old barn"
S2 = "a small cat and two brown dogs sleep"
S3 = "the farmer feeds three white geese beside the blue river"
S4 = "two boys carry a heavy box"
EXPECTED = {
    "repeat": (S1, S2, S3, S4),
    "count_words": ("eight", "eight", "ten", "six"),
    "first_word": ("the", "a", "the", "two"),
    "second_word": ("red", "small", "farmer", "boys"),
    "last_word": ("barn", "sleep", "river", "box"),
    "colour": ("red", "brown", "white", "none"),
    "count_colours": ("one", "one", "two", "zero"),
    "has_place": ("yes", "no", "yes", "no"),
    "has_person": ("no", "no", "yes", "yes"),
    "first_animal": ("fox", "cat", "goose", "none"),
    "place": ("barn", "nowhere", "river", "nowhere"),
    "action": ("runs", "sleep", "feeds", "carry"),
    "count_animals": ("one", "three", "three", "zero"),
    "reverse": (
        "barn old the near runs fox red the",
        "sleep dogs brown two and cat small a",
        "river blue the beside geese white three feeds farmer the",
        "box heavy a carry boys two",
    ),
}


@pytest.fixture(scope="module")
def train_sentences() -> list[str]:
    return toy_sentences.sentences("train", 2000, seed=0)


@pytest.fixture(scope="module")
def heldout_sentences() -> list[str]:
    return toy_sentences.sentences("heldout", 300, seed=0)


def test_task_inventory():
    names = [t.name for t in toy_tasks.TOY_TASKS]
    assert len(names) >= 12 and len(set(names)) == len(names)
    assert set(EXPECTED) == set(names)
    for task in toy_tasks.TOY_TASKS:
        assert isinstance(task, TextTask) and task.answer is not None
        assert len(task.prompts_train) + len(task.prompts_heldout) >= 6
        assert len(task.prompts_heldout) >= 2 and len(task.prompts_train) >= 4
    assert len(toy_tasks.HELDOUT_TASKS) >= 4 and set(toy_tasks.HELDOUT_TASKS) < set(names)
    assert set(toy_tasks.SEEN_TASKS) == set(names) - set(toy_tasks.HELDOUT_TASKS)


def test_prompts_are_plain_words_and_identify_their_task():
    all_prompts = [p for t in toy_tasks.TOY_TASKS for p in t.prompts_train + t.prompts_heldout]
    assert len(set(all_prompts)) == len(all_prompts)
    for prompt in all_prompts:
        tokens = prompt.split(" ")
        assert tokens.count("{content}") == 1
        assert all(re.fullmatch(r"[a-z]+", w) for w in tokens if w != "{content}"), prompt


def test_heldout_phrasings_use_only_trained_words():
    trained = set(vocab.sentence_words()) | {w for t in toy_tasks.TOY_TASKS for p in t.prompts_train for w in p.split()}
    for task in toy_tasks.TOY_TASKS:
        for prompt in task.prompts_heldout:
            assert set(prompt.split()) <= trained, (task.name, prompt)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_answers_on_handwritten_sentences(name):
    task = {t.name: t for t in toy_tasks.TOY_TASKS}[name]
    for sentence, expected in zip((S1, S2, S3, S4), EXPECTED[name], strict=True):
        assert task.answer(sentence) == expected, sentence


def test_parse_recovers_noun_phrases():
    parsed = toy_sentences.parse(S3)
    assert [(p.words, p.quantity, p.kind, p.lemma) for p in parsed.noun_phrases] == [
        (("the", "farmer"), 1, "person", "farmer"),
        (("three", "white", "geese"), 3, "animal", "goose"),
        (("the", "blue", "river"), 1, "place", "river"),
    ]
    assert parsed.verb == "feeds" and parsed.place == "river"


def test_every_word_is_in_the_vocabulary_and_examples_are_short(train_sentences, heldout_sentences):
    words = set(toy_tasks.all_words())
    assert 200 <= len(words) <= 600
    prompts = [(t, p) for t in toy_tasks.TOY_TASKS for p in t.prompts_train + t.prompts_heldout]
    for sentence in train_sentences[:300] + heldout_sentences[:100]:
        assert set(sentence.split()) <= words
        for task, prompt in prompts:
            answer = task.answer(sentence)
            assert 1 <= len(answer.split()) <= 10
            assert set(answer.split()) <= words, (task.name, sentence, answer)
            text = prompt.replace("{content}", sentence)
            assert set(text.split()) <= words
            assert len(text.split()) + len(answer.split()) <= 30


def test_word_tokenizer_covers_every_example(tmp_path, train_sentences):
    tokenizer = AutoTokenizer.from_pretrained(build_word_tokenizer(toy_tasks.all_words(), tmp_path))
    sentence = train_sentences[0]
    for task in toy_tasks.TOY_TASKS:
        for prompt in task.prompts_train + task.prompts_heldout:
            text = prompt.replace("{content}", sentence) + " " + task.answer(sentence)
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            assert tokenizer.unk_token_id not in ids and len(ids) == len(text.split())


def test_each_word_has_exactly_one_role():
    for a, b in itertools.combinations(vocab.ROLES, 2):
        assert not vocab.ROLES[a] & vocab.ROLES[b], (a, b)
    assert all(vocab.role(w) is not None for w in vocab.sentence_words())


def test_no_homophones_in_the_world():
    words = set(toy_tasks.all_words())
    for group in HOMOPHONES:
        assert len(words & set(group)) <= 1, group


def test_espeak_pronounces_every_word_distinctly():
    words = toy_tasks.all_words()
    # "to" is not in the world; it shows that the comparison does catch a homophone.
    result = subprocess.run(
        [sys.executable, "-c", PHONEMIZE], input=json.dumps([*words, "to"]), capture_output=True, text=True, check=True
    )
    # Stress and length marks aside, no two words may sound the same.
    sounds = {w: re.sub("[ˈˌː]", "", p) for w, p in json.loads(result.stdout).items()}
    assert sounds.pop("to") == sounds["two"]
    assert all(sounds[w] and " " not in sounds[w] for w in words)
    by_sound: dict[str, list[str]] = {}
    for word, sound in sounds.items():
        by_sound.setdefault(sound, []).append(word)
    assert [group for group in by_sound.values() if len(group) > 1] == []


def test_sentences_follow_the_grammar(train_sentences):
    lengths = {len(s.split()) for s in train_sentences}
    assert lengths == set(range(toy_sentences.MIN_WORDS, toy_sentences.MAX_WORDS + 1))
    for sentence in train_sentences:
        words = sentence.split()
        assert sentence == sentence.strip().lower() and "  " not in sentence
        for article, nxt in zip(words, words[1:]):
            if article in ("a", "an"):
                assert (article == "an") == (nxt[0] in "aeiou"), sentence
        parsed = toy_sentences.parse(sentence)
        assert parsed.verb is not None
        lemmas = [p.lemma for p in parsed.noun_phrases]
        assert len(set(lemmas)) == len(lemmas), sentence
        # Every noun phrase is counted: a quantity word or an article opens it.
        assert all(p.words[0] in vocab.ARTICLES + vocab.QUANTITIES for p in parsed.noun_phrases)


def test_splits_are_disjoint_and_deterministic(train_sentences, heldout_sentences):
    assert len(set(train_sentences)) == len(train_sentences)
    assert len(set(heldout_sentences)) == len(heldout_sentences)
    other_seed = toy_sentences.sentences("heldout", 300, seed=1)
    assert not set(train_sentences) & (set(heldout_sentences) | set(other_seed))
    assert other_seed != heldout_sentences
    assert toy_sentences.sentences("train", 2000, seed=0) == train_sentences
    assert toy_sentences.sentences("train", 50, seed=0) == train_sentences[:50]
    assert all(toy_sentences.split_of(s) == "heldout" for s in heldout_sentences)
    with pytest.raises(ValueError):
        toy_sentences.sentences("test", 1)


def test_register_toy_tasks_is_idempotent():
    registered = toy_tasks.register_toy_tasks()
    assert toy_tasks.register_toy_tasks() == registered
    assert set(registered) == {t.name for t in toy_tasks.TOY_TASKS}
    assert all(TASKS[name] is task for name, task in registered.items())


def test_number_words():
    assert vocab.number_word(0) == "zero" and vocab.number_word(15) == "fifteen"
    with pytest.raises(ValueError):
        vocab.number_word(16)


def test_copy_sequences_repeat_random_sentence_words_and_tokenize(tmp_path):
    from speechlm_jax.data.sources import text_source
    from speechlm_jax.toyworld.corpus import build_corpus

    folder = build_corpus(tmp_path, train_sentences=4, heldout_sentences=2, copy_sequences=300)
    rows = [json.loads(line) for line in (folder / "copy_lm.jsonl").read_text().splitlines()]
    assert len(rows) == 300 and len({r["id"] for r in rows}) == 300
    words = set(vocab.sentence_words())
    lengths = set()
    for row in rows:
        user, assistant = row["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert user["content"] == assistant["content"]
        sequence = user["content"].split()
        assert set(sequence) <= words
        lengths.add(len(sequence))
    assert lengths == set(range(3, 13))  # 3-12 words: the sentences' 3-10 and a little past
    # Not sentences of the grammar: copying, not the language model, predicts the answer.
    grammatical = set(toy_sentences.sentences("train", 50)) | set(toy_sentences.sentences("heldout", 50))
    assert not grammatical & {r["messages"][0]["content"] for r in rows}
    # Deterministic in the seed, and readable by the trainer's text source in the corpus's tokenizer.
    again = build_corpus(tmp_path / "again", train_sentences=4, heldout_sentences=2, copy_sequences=300)
    assert (again / "copy_lm.jsonl").read_text() == (folder / "copy_lm.jsonl").read_text()
    assert len(text_source(folder / "copy_lm.jsonl")) == 300
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    for row in rows[:50]:
        ids = tokenizer(row["messages"][0]["content"], add_special_tokens=False)["input_ids"]
        assert tokenizer.unk_token_id not in ids


def test_encoder_sentences_extend_the_training_stream_and_no_text_data_is_about_them(tmp_path):
    from speechlm_jax.toyworld.corpus import build_corpus, read_sentences

    plain = build_corpus(tmp_path / "plain", train_sentences=6, heldout_sentences=3)
    assert not (plain / "encoder.txt").exists()
    folder = build_corpus(tmp_path / "more", train_sentences=6, heldout_sentences=3, encoder_sentences=5)
    train, heldout = read_sentences(folder, "train"), read_sentences(folder, "heldout")
    encoder = read_sentences(folder, "encoder")
    # The training sentences and the teacher's data are those of a corpus without them.
    assert train == read_sentences(plain, "train") and heldout == read_sentences(plain, "heldout")
    assert (folder / "text_sft.jsonl").read_text() == (plain / "text_sft.jsonl").read_text()
    # The next five of the same training stream: distinct, and in neither split.
    assert encoder == toy_sentences.sentences("train", 11)[6:]
    assert len(set(encoder)) == 5 and not set(encoder) & (set(train) | set(heldout))
    assert all(toy_sentences.split_of(s) == "train" for s in encoder)
    # A rebuild without them removes the stale file.
    build_corpus(tmp_path / "more", train_sentences=6, heldout_sentences=3)
    assert not (folder / "encoder.txt").exists()
