"""The LLM's tokenizer, its chat template, and the audio placeholder token.

The example builder (`examples.py`) works on text and audio segments; this module turns
text segments into token ids and tells it how the LLM frames one user turn and the
assistant's answer. The frame comes from the tokenizer's own chat template, rendered once
with sentinel strings and split at them, so any HF template (Llama 3, Qwen, Gemma, ...)
works without per-family code:

    prefix            "<|begin_of_text|>...<|start_header_id|>user<|end_header_id|>\\n\\n"
    user text         the task prompt with the audio slots (or the transcript)
    assistant_header  "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\\n\\n"
    response          supervised
    end_of_turn       "<|eot_id|>" (supervised)

Audio slots occupy positions in the student sequence whose token id is `audio_token_id`;
the model replaces their embeddings, so the id only has to exist in the vocabulary. When
the tokenizer has no `<audio>` token we reuse its pad (else unk, else eos) id instead of
adding one, so the vocabulary, and with it a pretrained checkpoint's embedding table,
stays unchanged.

`build_word_tokenizer` writes a small word-level tokenizer folder (loadable by
`AutoTokenizer.from_pretrained`) with special tokens and a chat template, for tests and
the toy world.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from speechlm_jax import storage
from speechlm_jax.data.preflight import DataSourceError, tokenizer_problem

AUDIO_TOKEN = "<audio>"
WORD_SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>", AUDIO_TOKEN, "<system>", "<user>", "<assistant>")

# A chat template in the style of real ones: BOS, role-tagged turns each closed by EOS,
# and an assistant header for generation.
WORD_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<' + message['role'] + '> ' + message['content'] + ' ' + eos_token + ' ' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<assistant> ' }}{% endif %}"
)

# Plain words survive every template's trimming and escaping.
_USER_SENTINEL = "SENTINELUSERCONTENT"
_ASSISTANT_SENTINEL = "SENTINELASSISTANTCONTENT"


@dataclasses.dataclass(frozen=True)
class ChatFrame:
    """The text around one user turn and the assistant's answer."""

    prefix: str
    assistant_header: str
    end_of_turn: str


class SpeechTokenizer:
    """An HF tokenizer plus the chat frame and audio placeholder the example builder needs."""

    def __init__(
        self, hf_tokenizer: PreTrainedTokenizerBase, *, audio_token: str = AUDIO_TOKEN, use_chat_template: bool = True
    ):
        self.hf = hf_tokenizer
        self.audio_token = audio_token
        self.use_chat_template = use_chat_template and bool(getattr(hf_tokenizer, "chat_template", None))
        vocab = hf_tokenizer.get_vocab()
        fallback = [hf_tokenizer.pad_token_id, hf_tokenizer.unk_token_id, hf_tokenizer.eos_token_id]
        if audio_token in vocab:
            self.audio_token_id = int(vocab[audio_token])
        else:
            self.audio_token_id = int(next(i for i in fallback if i is not None))
        if hf_tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no EOS token")
        self.eos_id = int(hf_tokenizer.eos_token_id)
        self.bos_id = None if hf_tokenizer.bos_token_id is None else int(hf_tokenizer.bos_token_id)
        self.pad_id = int(hf_tokenizer.pad_token_id if hf_tokenizer.pad_token_id is not None else self.eos_id)

    def __len__(self) -> int:
        return len(self.hf)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special-token strings in it parsed, no BOS/EOS added."""
        if not text:
            return []
        return list(self.hf(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=True)

    @functools.cached_property
    def chat_frame(self) -> ChatFrame:
        """The chat template split at sentinels; a plain `BOS prompt \\n response EOS` without one."""
        if not self.use_chat_template:
            bos = self.hf.bos_token or ""
            return ChatFrame(prefix=bos, assistant_header="\n", end_of_turn=self.hf.eos_token)
        user = [{"role": "user", "content": _USER_SENTINEL}]
        rendered = self.hf.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        prefix, assistant_header = rendered.split(_USER_SENTINEL)
        full = self.hf.apply_chat_template(
            user + [{"role": "assistant", "content": _ASSISTANT_SENTINEL}], tokenize=False
        )
        end_of_turn = full.split(_ASSISTANT_SENTINEL)[1].rstrip()
        return ChatFrame(prefix=prefix, assistant_header=assistant_header, end_of_turn=end_of_turn or self.hf.eos_token)

    def render_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """The text of a conversation up to the assistant's answer (its header included)."""
        if self.use_chat_template:
            return self.hf.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        frame = self.chat_frame
        return frame.prefix + "\n".join(m["content"] for m in messages) + frame.assistant_header

    @functools.cached_property
    def stop_ids(self) -> tuple[int, ...]:
        """Token ids that end a response: EOS and the template's end-of-turn token."""
        ids = {self.eos_id}
        end = self.encode(self.chat_frame.end_of_turn)
        if end:
            ids.add(end[0])
        return tuple(sorted(ids))


def load_tokenizer(
    path: str | Path, *, audio_token: str = AUDIO_TOKEN, use_chat_template: bool = True
) -> SpeechTokenizer:
    """Loads an HF tokenizer folder (never the hub; local or in an object store, which is copied
    to local disk once per process) as a `SpeechTokenizer`.

    A path that is not such a folder raises `preflight.DataSourceError` naming it (the hub
    client would take it for a repo id and say that instead).
    """
    problem = tokenizer_problem(path)
    if problem is not None:
        raise DataSourceError(f"tokenizer: {problem}")
    hf = AutoTokenizer.from_pretrained(str(storage.local_copy(path)), local_files_only=True)
    return SpeechTokenizer(hf, audio_token=audio_token, use_chat_template=use_chat_template)


def build_word_tokenizer(texts: Iterable[str], out_dir: str | Path) -> Path:
    """Writes a word-level HF tokenizer folder whose vocabulary covers every word of `texts`.

    Words are what the whitespace pre-tokenizer yields (`\\w+` runs and punctuation runs),
    so `texts` may be whole sentences. Ids: the special tokens first
    (`<pad>`=0, `<bos>`=1, `<eos>`=2, `<unk>`=3, `<audio>`=4, role tags), then the words
    in first-seen order. The folder loads with `AutoTokenizer.from_pretrained(out_dir)`.
    """
    pre_tokenizer = pre_tokenizers.Whitespace()
    vocab = {token: i for i, token in enumerate(WORD_SPECIAL_TOKENS)}
    for text in texts:
        for word, _ in pre_tokenizer.pre_tokenize_str(text):
            vocab.setdefault(word, len(vocab))
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizer
    hf = PreTrainedTokenizerFast(
        tokenizer_object=model,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=list(WORD_SPECIAL_TOKENS[4:]),
        clean_up_tokenization_spaces=True,
    )
    hf.chat_template = WORD_CHAT_TEMPLATE
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(str(out))
    return out
