"""The example builder: segments -> student sequence, teacher twin, labels, masks, KL map.

A task describes an example as a list of segments, in order: `Text` (tokenized, shared
by student and teacher) and `Audio` (a clip and its transcript). The student sees each
`Audio` as an audio slot: `audio_token_count(len(clip), downsample)` placeholder positions
that the model fills with projector frames. The teacher, the same LLM reading text only,
sees the transcript in its place. `Text(..., supervised=True)` marks the response (and
its end-of-turn token): the positions predicting those tokens carry `loss_mask` 1.

Token-level KL needs, for each student position, the teacher position that predicts the
same next token. Student position t predicts token t+1; when that token is text, it
exists in the teacher too (text segments are shared token for token), at teacher
position u', and the teacher predicts it from u'-1. So `teacher_index[t] = u' - 1` and
`kl_mask[t] = 1`. When token t+1 is an audio frame there is no teacher counterpart:
`kl_mask[t] = 0`. Worked example, prompt "Repeat {content}", content "the cat sat"
with "cat" spoken (2 frames, `A` = placeholder), response "the cat sat" (the chat
template's tokens shortened to `<bos>` and `<assist>`):

    student   pos: 0      1      2    3    4    5    6          7    8    9    10
              tok: <bos>  Repeat the  A0   A1   sat  <assist>   the  cat  sat  <eos>
    teacher   pos: 0      1      2    3    4    5          6    7    8    9
              tok: <bos>  Repeat the  cat  sat  <assist>   the  cat  sat  <eos>

    student t   :  0  1  2  3  4  5  6  7  8  9
    next token  :  Repeat the  A0  A1  sat <assist> the cat sat <eos>
    kl_mask     :  1  1  0  0  1  1  1  1  1  1
    teacher_idx :  0  1  0  0  3  4  5  6  7  8
    loss_mask   :  0  0  0  0  0  0  1  1  1  1

Position 4 (the last frame of the slot) predicts "sat", as teacher position 3 ("cat", the
last transcript token of the span) does. Positions 2 and 3 predict audio frames: no KL.
Without audio slots the teacher twin equals the student and `teacher_index[t] = t`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from speechlm_jax.data.tokenizer import SpeechTokenizer
from speechlm_jax.models.frontend import audio_token_count


@dataclasses.dataclass(frozen=True)
class Text:
    """Text shared by student and teacher; `supervised` marks response tokens."""

    text: str
    supervised: bool = False


@dataclasses.dataclass(frozen=True, eq=False)
class Audio:
    """An audio slot for the student (int16 `[samples]` at 16 kHz); `transcript` for the teacher."""

    waveform: np.ndarray
    transcript: str


Segment = Text | Audio


class ExampleError(ValueError):
    """An example that cannot be built; `reason` is the skip counter it goes to."""

    def __init__(self, reason: str, message: str = ""):
        super().__init__(message or reason)
        self.reason = reason


@dataclasses.dataclass(eq=False)
class Example:
    """One unpadded example. Student arrays are `[T]`, teacher arrays `[U]`.

    `audio_slot[t]`/`audio_frame[t]` locate position t's audio frame (-1 on text); the
    batcher turns them into `audio_index = slot * F + frame` once the bucket fixes F.
    `audio_labels[k]` are the token ids of slot k's transcript (the teacher twin's tokens
    for that span; CTC's labels).
    """

    tokens: np.ndarray
    audio_slot: np.ndarray
    audio_frame: np.ndarray
    targets: np.ndarray
    loss_mask: np.ndarray
    kl_mask: np.ndarray
    teacher_index: np.ndarray
    teacher_tokens: np.ndarray
    teacher_targets: np.ndarray
    teacher_loss_mask: np.ndarray
    audio: list[np.ndarray]
    audio_labels: list[np.ndarray] = dataclasses.field(default_factory=list)
    task_id: int = 0
    split: bool = False
    bucket: int = -1
    index: int = -1

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def num_teacher_tokens(self) -> int:
        return len(self.teacher_tokens)

    @property
    def max_audio_samples(self) -> int:
        return max((len(a) for a in self.audio), default=0)


@dataclasses.dataclass(frozen=True)
class Skipped:
    """What the example map yields in place of an example it could not build: `reason` is the
    skip counter, `message` what a person reads (the record and what is wrong with it)."""

    reason: str
    message: str = ""


def _shift(values: np.ndarray, fill) -> np.ndarray:
    """values[t + 1] at t, `fill` at the last position."""
    return np.concatenate([values[1:], np.asarray([fill], values.dtype)])


def build_example(
    segments: Sequence[Segment], tokenizer: SpeechTokenizer, *, downsample: int, task_id: int = 0
) -> Example:
    """Tokenizes `segments` into the student sequence, the teacher twin and their alignment.

    Raises ExampleError("too_short") when a clip is too short to give one audio frame.
    """
    tokens: list[int] = []
    slot: list[int] = []
    frame: list[int] = []
    supervised: list[bool] = []
    # For each student token: its position in the teacher twin (-1 for audio frames).
    in_teacher: list[int] = []
    teacher: list[int] = []
    teacher_supervised: list[bool] = []
    audio: list[np.ndarray] = []
    audio_labels: list[np.ndarray] = []
    for segment in segments:
        if isinstance(segment, Text):
            ids = tokenizer.encode(segment.text)
            in_teacher.extend(range(len(teacher), len(teacher) + len(ids)))
            tokens.extend(ids)
            teacher.extend(ids)
            slot.extend([-1] * len(ids))
            frame.extend([-1] * len(ids))
            supervised.extend([segment.supervised] * len(ids))
            teacher_supervised.extend([segment.supervised] * len(ids))
        else:
            frames = audio_token_count(len(segment.waveform), downsample)
            if frames < 1:
                raise ExampleError("too_short", f"a clip of {len(segment.waveform)} samples gives no frame")
            tokens.extend([tokenizer.audio_token_id] * frames)
            slot.extend([len(audio)] * frames)
            frame.extend(range(frames))
            supervised.extend([False] * frames)
            in_teacher.extend([-1] * frames)
            ids = tokenizer.encode(segment.transcript)
            teacher.extend(ids)
            teacher_supervised.extend([False] * len(ids))
            audio.append(np.asarray(segment.waveform, dtype=np.int16))
            audio_labels.append(np.asarray(ids, np.int32))

    tokens_np = np.asarray(tokens, np.int32)
    in_teacher_np = np.asarray(in_teacher, np.int32)
    next_in_teacher = _shift(in_teacher_np, -1)
    kl_mask = (next_in_teacher >= 1).astype(np.float32)
    teacher_np = np.asarray(teacher, np.int32)
    return Example(
        tokens=tokens_np,
        audio_slot=np.asarray(slot, np.int32),
        audio_frame=np.asarray(frame, np.int32),
        targets=_shift(tokens_np, tokenizer.pad_id),
        loss_mask=_shift(np.asarray(supervised, np.float32), 0.0),
        kl_mask=kl_mask,
        teacher_index=np.where(kl_mask > 0, next_in_teacher - 1, 0).astype(np.int32),
        teacher_tokens=teacher_np,
        teacher_targets=_shift(teacher_np, tokenizer.pad_id),
        teacher_loss_mask=_shift(np.asarray(teacher_supervised, np.float32), 0.0),
        audio=audio,
        audio_labels=audio_labels,
        task_id=task_id,
    )


def prompt_segments(
    tokenizer: SpeechTokenizer, prompt: str, content: Sequence[Segment], response: str
) -> list[Segment]:
    """One chat turn: `prompt` with `content` at `{content}`, then the supervised response.

    The content's segments are expected to carry their own leading spaces (see
    `interleave.content_segments`); the prompt's whitespace before `{content}` moves onto
    the content so BPE tokenizers see " word" as they do in running text.
    """
    frame = tokenizer.chat_frame
    before, after = prompt.split("{content}")
    return [
        Text(frame.prefix + before.rstrip()),
        *content,
        Text(after + frame.assistant_header),
        Text(response, supervised=True),
        Text(frame.end_of_turn, supervised=True),
    ]


def leading_space(prompt: str) -> bool:
    """Whether the content placed at `{content}` follows text and so starts with a space."""
    before = prompt.split("{content}")[0]
    return bool(before.strip())


def chat_segments(
    tokenizer: SpeechTokenizer, messages: Sequence[dict[str, str]], *, supervise_prompt: bool = False
) -> list[Segment]:
    """A text-only conversation; the last (assistant) turn is supervised.

    `supervise_prompt` supervises every token (language modelling over the whole
    conversation, "train on inputs"): many more targets per example, which is what a
    model trained from scratch needs to learn the language its prompts are written in.
    """
    prompt = tokenizer.render_prompt(messages[:-1])
    return [
        Text(prompt, supervised=supervise_prompt),
        Text(messages[-1]["content"], supervised=True),
        Text(tokenizer.chat_frame.end_of_turn, supervised=True),
    ]
