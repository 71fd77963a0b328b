"""Multi-turn conversations: chat records whose user turns are text, speech, or both.

A conversation file is JSONL, one conversation a line, in the chat-message format of HF
chat templates and OpenAI's API, with audio parts as transformers' audio chat templates
write them (plus the transcript the teacher's text twin needs):

    {"id": "c1",
     "messages": [
       {"role": "system", "content": "You are a helpful assistant."},           optional
       {"role": "user", "content": [
          {"type": "audio", "audio": "wav/c1-0.flac", "transcript": "the cat sat"},
          {"type": "text", "text": "what is the first word"}]},
       {"role": "assistant", "content": "the"},
       {"role": "user", "content": "and the last word"},                        plain text
       {"role": "assistant", "content": "sat"}]}

`content` is a string (text) or a list of parts; a part is `{"type": "text", "text"}` or
`{"type": "audio", "audio": path, "transcript", "words"?}` (a path relative to the file's
folder, like a manifest's; `words` the optional word timings `[{"w", "start", "end"}]`, with
which the pipeline interleaves the part as it does an utterance, `data.interleave_prob`).
Only user turns may hold audio; system and assistant turns are text. A user turn of text and
audio parts is VoiceTextBlender's mixed-modal input. Messages after the last assistant turn
carry nothing to learn and are left out.

Every assistant turn is supervised: the positions predicting its tokens and the template's
end-of-turn token have `loss_mask` 1. The text between the messages is the tokenizer's own
chat template: the conversation is rendered once with a sentinel word in place of each
message's content and cut at the sentinels (`turn_pieces`), as `tokenizer.chat_frame` does
for one turn, so any HF template works. The student reads each audio part as an audio slot,
the teacher its transcript (`examples.build_example`), so the KL alignment of SALAD holds
over every turn.

A line that cannot be a conversation is skipped and counted in the source's `skipped` by
cause, with a warning naming the file and line, and the other lines are read:
`bad_json` (not a JSON object), `bad_record` (no `messages` list), `bad_message` (a message
or part of the wrong schema: the warning says which message and what is wrong) and
`no_assistant_turn` (nothing to learn). Each line is a record or one skip count.

Responses: `"record"` trains on the record's assistant turns (SFT: VoiceTextBlender, the
asr-style baselines); `"teacher"` replaces every assistant turn with the teacher's own
answer (MTBI, SALAD's NLL part), read from the targets `speechlm-generate` writes: one row
per assistant turn, `{"id", "task": "conversation", "prompt": "messages[i]", "response"}`,
where `messages[i]` is the turn's index in the record. The teacher answered turn i given
the text twin of the conversation before it, with its own earlier answers in place of the
record's (`evaluation.targets`), so a training sequence is one rollout of the teacher.
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jinja2

from speechlm_jax import storage
from speechlm_jax.data.config import CONVERSATION_KIND
from speechlm_jax.data.examples import ExampleError, Segment, Text
from speechlm_jax.data.sources import ListSource, Record
from speechlm_jax.data.tokenizer import SpeechTokenizer

log = logging.getLogger(__name__)

CONVERSATION_TASK = CONVERSATION_KIND  # the `task` of conversation targets rows
ROLES = ("system", "user", "assistant")
RESPONSES = ("record", "teacher")


class ConversationError(ValueError):
    """A line that cannot be a conversation; `reason` is its skip counter."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def turn_key(index: int) -> str:
    """The `prompt` of the targets row answering assistant message `index`."""
    return f"messages[{index}]"


def _part(part: Any, where: str, folder: storage.PathLike) -> dict[str, str]:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise ConversationError("bad_message", f"{where}: a part must be an object, got {type(part).__name__}")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ConversationError("bad_message", f"{where}: a text part needs a string 'text'")
        return {"type": "text", "text": part["text"]}
    if kind == "audio":
        audio, transcript = part.get("audio"), part.get("transcript")
        if not isinstance(audio, str) or not audio:
            raise ConversationError("bad_message", f"{where}: an audio part needs an 'audio' path")
        if not isinstance(transcript, str) or not transcript.split():
            raise ConversationError(
                "bad_message", f"{where}: an audio part needs its 'transcript' (the teacher reads it)"
            )
        out = {"type": "audio", "audio": storage.beside(folder, audio), "transcript": " ".join(transcript.split())}
        words = part.get("words")
        if words is not None:
            timed = isinstance(words, list) and all(
                isinstance(w, dict)
                and isinstance(w.get("w"), str)
                and all(isinstance(w.get(k), (int, float)) and not isinstance(w.get(k), bool) for k in ("start", "end"))
                for w in words
            )
            if not timed:
                raise ConversationError("bad_message", f"{where}: 'words' must be a list of {{w, start, end}}")
            out["words"] = [{"w": w["w"], "start": float(w["start"]), "end": float(w["end"])} for w in words]
        return out
    raise ConversationError("bad_message", f"{where}: unknown part type {kind!r} (text or audio)")


def parse_conversation(row: Any, *, folder: storage.PathLike = ".") -> list[dict[str, Any]]:
    """A JSON line's messages, normalised: `{"role", "content": [parts]}` ending with an assistant turn.

    Text contents become one text part; audio paths are resolved against `folder`.
    Raises ConversationError naming the message and what is wrong.
    """
    if not isinstance(row, dict):
        raise ConversationError("bad_json", "not a JSON object")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ConversationError("bad_record", "no 'messages' list")
    out = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise ConversationError("bad_message", f"{where}: a message must be an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ConversationError("bad_message", f"{where}: role {role!r} is not one of {ROLES}")
        if isinstance(content, str):
            parts = [{"type": "text", "text": content}]
        elif isinstance(content, list) and content:
            parts = [_part(p, f"{where}.content[{k}]", folder) for k, p in enumerate(content)]
        else:
            raise ConversationError("bad_message", f"{where}: content must be a string or a list of parts")
        if role != "user" and any(p["type"] == "audio" for p in parts):
            raise ConversationError("bad_message", f"{where}: only user turns may hold audio, not {role}")
        if role == "assistant" and not "".join(p["text"] for p in parts).strip():
            raise ConversationError("bad_message", f"{where}: an assistant turn with no text")
        out.append({"role": role, "content": parts})
    last = max((i for i, m in enumerate(out) if m["role"] == "assistant"), default=-1)
    if last < 0:
        raise ConversationError("no_assistant_turn", "no assistant turn: nothing to learn")
    return out[: last + 1]


def conversation_source(path: storage.PathLike) -> ListSource:
    """The conversations of a JSONL file as records `{"id", "conversation": [messages]}`.

    A line that is not a conversation is warned about (`file:line: ...`) and counted in
    `skipped` by cause (see the module docstring); the source keeps every other line.
    """
    file = storage.path(path)
    skipped: Counter = Counter()
    records = []
    with file.open("r") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ConversationError("bad_json", f"not JSON ({error.msg})") from None
                messages = parse_conversation(row, folder=file.parent)
            except ConversationError as error:
                skipped[error.reason] += 1
                log.warning("%s:%d: conversation skipped (%s): %s", file, number, error.reason, error)
                continue
            records.append({"id": str(row.get("id", f"{file.stem}-{number}")), "conversation": messages})
    return ListSource(records, skipped)


# --- The chat template around the messages.

_SENTINEL = "SENTINELTURN{}X"  # plain words survive every template's trimming and escaping


@functools.lru_cache(maxsize=512)
def turn_pieces(tokenizer: SpeechTokenizer, roles: tuple[str, ...]) -> tuple[str, ...]:
    """The template's text before, between and after the messages: `len(roles) + 1` strings.

    Raises ExampleError("template_refused") when the template will not render these roles
    (some templates demand strict user/assistant alternation).
    """
    if not tokenizer.use_chat_template:
        frame = tokenizer.chat_frame
        pieces = [frame.prefix]
        for role in roles:
            pieces.append(frame.end_of_turn if role == "assistant" else frame.assistant_header)
        return tuple(pieces)
    messages = [{"role": r, "content": _SENTINEL.format(i)} for i, r in enumerate(roles)]
    try:
        rendered = tokenizer.hf.apply_chat_template(messages, tokenize=False)
    except jinja2.TemplateError as error:
        raise ExampleError("template_refused", f"the chat template refuses roles {roles}: {error}") from None
    pattern = "|".join(re.escape(_SENTINEL.format(i)) for i in range(len(roles)))
    pieces = re.split(pattern, rendered)
    found = re.findall(pattern, rendered)
    if found != [_SENTINEL.format(i) for i in range(len(roles))]:
        raise ExampleError("template_refused", f"the chat template does not render every message of {roles}")
    return tuple(pieces)


Spoken = Callable[[Mapping[str, str], bool], list[Segment]]


def _user_content(parts: Sequence[Mapping[str, str]], spoken: Spoken) -> list[Segment]:
    """A user turn's parts in order, joined by single spaces (as a text twin would read them)."""
    segments: list[Segment] = []
    for k, part in enumerate(parts):
        space = " " if k > 0 else ""
        if part["type"] == "text":
            segments.append(Text(space + part["text"]))
        else:
            segments.extend(spoken(part, k > 0))
    return segments


def text_twin(part: Mapping[str, str], lead_space: bool) -> list[Segment]:
    """An audio part read as its transcript (the teacher's view, and `speechlm-generate`'s)."""
    return [Text((" " if lead_space else "") + part["transcript"])]


def conversation_segments(
    tokenizer: SpeechTokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    spoken: Spoken = text_twin,
    responses: Mapping[int, str] | None = None,
    until: int | None = None,
) -> list[Segment]:
    """Segments of a conversation through the chat template, every assistant turn supervised.

    `spoken(part, lead_space)` gives an audio part's segments (`Audio` slots for the student;
    the transcript by default). `responses[i]` replaces assistant message i's text (the
    teacher's answers). `until = i` stops at the start of assistant message i's answer: the
    prompt the teacher continues to answer it (its earlier answers still supervised). That
    prompt is the start of the whole conversation's rendering, so the teacher answers exactly
    the tokens a training example holds before the turn, even under a template that renders a
    turn differently once later turns follow it.
    """
    pieces = turn_pieces(tokenizer, tuple(m["role"] for m in messages))
    end_of_turn = tokenizer.chat_frame.end_of_turn
    segments: list[Segment] = [Text(pieces[0])]
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            if i == until:
                return segments
            text = (responses or {}).get(i, "".join(p["text"] for p in message["content"]))
            after = pieces[i + 1]
            if not after.startswith(end_of_turn):
                raise ExampleError(
                    "template_refused", f"the template does not end an assistant turn with {end_of_turn!r}"
                )
            segments += [Text(text, supervised=True), Text(end_of_turn, supervised=True)]
            rest = after[len(end_of_turn) :]
        else:
            segments += _user_content(message["content"], spoken)
            rest = pieces[i + 1]
        if rest:
            segments.append(Text(rest))
    if until is not None:
        raise ValueError(f"message {until} is not an assistant turn")
    return segments


def assistant_turns(messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """Indices of the assistant messages."""
    return [i for i, m in enumerate(messages) if m["role"] == "assistant"]


def teacher_responses(record: Record, targets: Any) -> dict[int, str]:
    """The teacher's answer to each assistant turn of `record` (targets rows); ExampleError("no_target")."""
    table = targets.lookup(record["id"], CONVERSATION_TASK)
    responses = {}
    for i in assistant_turns(record["conversation"]):
        if turn_key(i) not in table:
            raise ExampleError("no_target", f"no teacher answer to {turn_key(i)} of {record['id']}")
        responses[i] = table[turn_key(i)]
    return responses
