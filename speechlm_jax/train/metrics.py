"""What a run reports: TensorBoard scalars, a console progress bar with ETA, and MFU.

MFU = (model FLOPs of one optimiser step) / (step time x peak FLOP/s of all devices).
The FLOP count is analytic (`step_flops`) and counts matrix multiplies only (2 FLOPs per
multiply-add), as PaLM's MFU does; norms, softmax, RoPE and the log-mel are left out.

Forward, per example:
  encoder    conv1 2*3*n_mels*d*M + conv2 2*3*d*d*E, then per layer and frame
             2*(4*d*d + 2*d*ffn) + 2*2*E*d (scores and values over all E frames)
             (M mel frames, E = (M + 1) // 2 encoder frames, per audio slot)
  projector  per output frame 2*(k*d_audio*hidden + hidden*d_llm)
  LLM        per token 2*(q, k, v, o, gate, up, down kernels) + 2*2*T/2*heads*head_dim
             (causal attention: on average half the T keys) + 2*D*V (unembedding)
  LoRA       per token and adapted kernel 2*r*(in + out)
  teacher    the LLM forward on the U teacher tokens (no backward: stop_gradient)

Backward: a matmul y = x W costs one forward again for dx and one for dW. dW is counted
for trainable kernels only; dx is counted for every part through which a gradient must
flow to reach a trainable parameter: a frozen LLM still back-propagates through all its
layers to reach the projector (that is most of a projector-only step), while a frozen
encoder with nothing trainable below it has no backward at all. Attention scores and
values have no weights: their backward is two forwards. Remat recomputation is not
counted (MFU, not hardware FLOPs utilisation).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from speechlm_jax import storage
from speechlm_jax.models.frontend import audio_token_count, encoder_frame_count, encoder_frames_of_mel, mel_frame_count
from speechlm_jax.train.chips import chip_of
from speechlm_jax.train.wandb_run import WandbRun

# A CPU has no datasheet figure in `train.chips`: a nominal 32 fp32 FLOP/cycle (two AVX2 FMA units)
# at 2.5 GHz per core, so CPU MFU numbers compare runs, not machines.
CPU_FLOPS_PER_CORE = 32 * 2.5e9


def peak_flops(device: jax.Device) -> float:
    """Peak FLOP/s of one device: its chip's (`train.chips`), nominal for CPUs (see CPU_FLOPS_PER_CORE)."""
    if device.platform == "cpu":
        return CPU_FLOPS_PER_CORE * (os.cpu_count() or 1) / max(jax.local_device_count(), 1)
    return chip_of(device.device_kind).peak_flops


@dataclasses.dataclass(frozen=True)
class StepShape:
    """The static shape of one optimiser step's batch (all microbatches together)."""

    batch: int  # examples
    audio_slots: int  # S
    audio_samples: int  # L (16 kHz samples per slot)
    tokens: int  # T (student sequence)
    teacher_tokens: int  # U (0 when the recipe has no teacher forward)


def _llm_forward(c: Any, tokens: int, lora_rank: int, lora_kernels: Sequence[tuple[int, int]]) -> dict[str, float]:
    d, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    kernels = d * q + 2 * d * kv + q * d + 3 * d * c.intermediate_size
    per_layer = 2 * kernels * tokens
    attention = 2 * 2 * tokens * (tokens / 2) * q
    lora = sum(2 * lora_rank * (i + o) for i, o in lora_kernels) * tokens
    return {
        "kernels": float(per_layer * c.num_hidden_layers),
        "attention": float(attention * c.num_hidden_layers),
        "unembed": float(2 * d * c.vocab_size * tokens),
        "lora": float(lora),
    }


def _encoder_forward(c: Any, mel_frames: int) -> dict[str, float]:
    window = 2 * c.max_source_positions
    if mel_frames > window:
        # Audio past one window is encoded as ceil(frames / window) full windows (`models.speechlm.encode_windows`).
        one = _encoder_forward(c, window)
        return {k: v * -(-mel_frames // window) for k, v in one.items()}
    d, e = c.d_model, encoder_frames_of_mel(mel_frames)
    stem = 2 * 3 * c.num_mel_bins * d * mel_frames + 2 * 3 * d * d * e
    kernels = 2 * (4 * d * d + 2 * d * c.encoder_ffn_dim) * e
    return {
        "kernels": float(stem + kernels * c.encoder_layers),
        "attention": float(2 * 2 * e * e * d * c.encoder_layers),
    }


def step_flops(
    shape: StepShape,
    *,
    llm_config: Any,
    encoder_config: Any,
    projector_flops_per_frame: float,
    downsample: int,
    trainable: Sequence[str],
    lora_rank: int = 0,
    llm_lora_kernels: Sequence[tuple[int, int]] = (),
    encoder_lora_kernels: Sequence[tuple[int, int]] = (),
    length_adapter: bool | str = False,
) -> dict[str, float]:
    """Model FLOPs of one optimiser step, by part; "total" is what MFU divides by.

    `*_lora_kernels` are the (in, out) shapes of the adapted kernels of one layer's worth
    summed over layers for the encoder (per frame) and the LLM (per token). `length_adapter`:
    the CTC length adapter's greedy readout of every projector frame through the LLM's head
    (forward only: its labels take no gradient); "embeddings" (its output) adds each pooled
    position's posterior through the head and the posterior-weighted sum of the input
    embeddings, forward and, when anything below the LLM trains, backward to the frames. Its
    pooled frames keep the slot's static length, so the LLM's own FLOPs are the same with it
    and without.
    """
    trainable = set(trainable)
    clips = shape.batch * shape.audio_slots
    mel_frames = mel_frame_count(shape.audio_samples)
    enc_frames = encoder_frame_count(shape.audio_samples)
    audio_tokens = audio_token_count(shape.audio_samples, downsample)

    enc = _encoder_forward(encoder_config, mel_frames)
    enc_lora = sum(2 * lora_rank * (i + o) for i, o in encoder_lora_kernels) * enc_frames
    llm = _llm_forward(llm_config, shape.tokens, lora_rank, llm_lora_kernels)
    teacher = _llm_forward(llm_config, shape.teacher_tokens, 0, ()) if shape.teacher_tokens else {}

    encoder_trains = "encoder" in trainable or bool(encoder_lora_kernels and "lora" in trainable)
    projector_trains = "projector" in trainable or encoder_trains
    llm_trains = "llm" in trainable

    out: dict[str, float] = {}
    enc_fwd = clips * (enc["kernels"] + enc["attention"] + enc_lora)
    out["encoder_forward"] = enc_fwd
    # The encoder back-propagates only when something in it trains.
    enc_dx = clips * (enc["kernels"] + 2 * enc["attention"] + enc_lora) if encoder_trains else 0.0
    enc_dw = clips * (enc["kernels"] if "encoder" in trainable else 0.0) + clips * (
        enc_lora if "lora" in trainable else 0.0
    )
    out["encoder_backward"] = enc_dx + enc_dw

    proj_fwd = clips * audio_tokens * projector_flops_per_frame
    out["projector_forward"] = proj_fwd
    proj_dw = proj_fwd if "projector" in trainable else 0.0
    proj_dx = proj_fwd if encoder_trains else 0.0
    out["projector_backward"] = proj_dw + proj_dx

    llm_fwd = shape.batch * sum(llm.values())
    out["llm_forward"] = llm_fwd
    # The LLM back-propagates to its input whenever anything below it (projector, encoder) trains.
    needs_dx = projector_trains or llm_trains or "lora" in trainable
    llm_dx = shape.batch * (llm["kernels"] + 2 * llm["attention"] + llm["unembed"] + llm["lora"]) if needs_dx else 0.0
    llm_dw = shape.batch * ((llm["kernels"] + llm["unembed"]) if llm_trains else 0.0)
    llm_dw += shape.batch * (llm["lora"] if "lora" in trainable else 0.0)
    out["llm_backward"] = llm_dx + llm_dw

    out["teacher_forward"] = shape.batch * sum(teacher.values())
    d, v = llm_config.hidden_size, llm_config.vocab_size
    readout = 2.0 * clips * audio_tokens * d * v  # one [positions, D] @ [D, V] over every slot
    out["length_adapter"] = readout if length_adapter else 0.0
    if length_adapter == "embeddings":
        out["length_adapter"] += 2 * readout * (2.0 if projector_trains else 1.0)
    out["total"] = sum(out.values())
    return out


def mfu(flops_per_step: float, step_seconds: float, devices: Sequence[jax.Device]) -> float:
    """Model FLOPs utilisation of `devices` for a step of `flops_per_step` taking `step_seconds`."""
    return flops_per_step / step_seconds / sum(peak_flops(d) for d in devices)


class MetricWriter:
    """TensorBoard event files (tensorboardX) under `<workdir>/tensorboard/<split>` and a JSONL log, host 0 only;
    with `wandb` (a `wandb_run.WandbRun`), the same scalars to Weights & Biases as `<split>/<name>`.

    The workdir may be in an object store: the event files are written to a local folder and
    uploaded after each write (`storage.SyncedDir`), and metrics.jsonl is an `storage.Appender`.
    """

    def __init__(self, workdir: storage.PathLike, *, enabled: bool = True, wandb: WandbRun | None = None):
        self.enabled = enabled and jax.process_index() == 0
        self.wandb = wandb if self.enabled else None
        self._writers: dict[str, Any] = {}
        self.directory = storage.path(workdir) / "tensorboard"
        self.jsonl = storage.path(workdir) / "metrics.jsonl"
        self._events = storage.SyncedDir(self.directory) if self.enabled else None
        self._lines = storage.Appender(self.jsonl)

    def _writer(self, split: str) -> Any:
        from tensorboardX import SummaryWriter

        if split not in self._writers:
            self._writers[split] = SummaryWriter(str(self._events.local / split))
        return self._writers[split]

    def write(self, step: int, scalars: Mapping[str, float], split: str = "train") -> None:
        """Writes scalars as TensorBoard events and one line of `<workdir>/metrics.jsonl`."""
        if not self.enabled:
            return
        self._lines.append(
            json.dumps({"step": step, "split": split, **{k: float(v) for k, v in scalars.items()}}) + "\n"
        )
        writer = self._writer(split)
        for name, value in scalars.items():
            writer.add_scalar(name, float(value), step)
        writer.flush()
        self._events.sync()
        if self.wandb is not None:
            self.wandb.log(step, scalars, split)

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        if self._events is not None:
            self._events.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def skip_summary(scalars: Mapping[str, float]) -> str:
    """The data skips in a metrics record (`data/skipped/<cause>`, `data/source_skipped/<cause>`),
    largest first: "5 (3 missing_file, 2 too_short)"; "" when nothing was skipped."""
    causes: dict[str, int] = {}
    for key, value in scalars.items():
        for prefix in ("data/skipped/", "data/source_skipped/"):
            if key.startswith(prefix) and value:
                cause = key[len(prefix) :]
                causes[cause] = causes.get(cause, 0) + int(value)
    if not causes:
        return ""
    ranked = sorted(causes.items(), key=lambda item: (-item[1], item[0]))
    return f"{sum(causes.values())} (" + ", ".join(f"{n} {cause}" for cause, n in ranked) + ")"


class ProgressBar:
    """A tqdm bar over optimiser steps (resumes at the restored step) showing loss, rates and
    the data skipped by cause; on close, one summary line of the skips."""

    def __init__(self, total: int, initial: int, *, enabled: bool = True):
        from tqdm import tqdm

        self.skipped = ""
        self.bar = tqdm(
            total=total,
            initial=initial,
            disable=not enabled or jax.process_index() != 0,
            unit="step",
            dynamic_ncols=True,
        )

    def update(self, steps: int, scalars: Mapping[str, float]) -> None:
        self.bar.update(steps)
        shown = {k: f"{scalars[k]:.4g}" for k in ("loss", "tokens_per_s", "mfu") if k in scalars}
        self.skipped = skip_summary(scalars) or self.skipped
        if self.skipped:
            shown["skipped"] = self.skipped
        self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        shown = not self.bar.disable  # closing disables the bar
        self.bar.close()
        if self.skipped and shown:
            self.bar.write(f"data skipped: {self.skipped}", file=self.bar.fp)


class ModelFlops:
    """`step_flops` for the batch shapes a run meets, read off an (abstract) SpeechLM."""

    def __init__(self, model: Any, trainable: Sequence[str], *, uses_teacher: bool, downsample: int):
        from speechlm_jax.models.lora import linear_modules

        adapter = model.length_adapter
        self.length_adapter = adapter.output if adapter is not None else False
        self.llm_config = model.llm.config
        self.encoder_config = model.encoder.config
        self.trainable = tuple(trainable)
        self.uses_teacher = uses_teacher
        self.downsample = downsample
        # A Linear of scanned layers stacks every layer's kernel [layers, in, out]: one entry per layer.
        adapted = [
            (path, linear)
            for path, linear in linear_modules(model)
            if linear.has_lora
            for _ in range(int(np.prod(linear.kernel.get_value().shape[:-2])))
        ]
        self.lora_rank = adapted[0][1].lora_a.shape[-1] if adapted else 0
        self.llm_lora = [(m.in_features, m.out_features) for p, m in adapted if p.startswith("llm/")]
        self.encoder_lora = [(m.in_features, m.out_features) for p, m in adapted if p.startswith("encoder/")]
        kernels = [v for p, v in nnx.to_flat_state(nnx.state(model.projector, nnx.Param)) if p[-1] == "kernel"]
        self.projector_per_frame = 2.0 * sum(int(np.prod(v.get_value().shape)) for v in kernels)
        self._cache: dict[tuple[int, ...], dict[str, float]] = {}

    def breakdown(self, shape: StepShape) -> dict[str, float]:
        """FLOPs of one step of `shape`, by part, plus "total"."""
        return step_flops(
            shape,
            llm_config=self.llm_config,
            encoder_config=self.encoder_config,
            projector_flops_per_frame=self.projector_per_frame,
            downsample=self.downsample,
            trainable=self.trainable,
            lora_rank=self.lora_rank,
            llm_lora_kernels=self.llm_lora,
            encoder_lora_kernels=self.encoder_lora,
            length_adapter=self.length_adapter,
        )

    def shape_of(self, batch: Mapping[str, Any]) -> StepShape:
        b, s, samples = batch["audio"].shape
        u = batch["teacher_tokens"].shape[1] if self.uses_teacher else 0
        return StepShape(
            batch=b * jax.process_count(),
            audio_slots=s,
            audio_samples=samples,
            tokens=batch["tokens"].shape[1],
            teacher_tokens=u,
        )

    def of_batch(self, batch: Mapping[str, Any]) -> float:
        """Total FLOPs of a step on this host batch (all hosts together)."""
        shape = self.shape_of(batch)
        key = dataclasses.astuple(shape)
        if key not in self._cache:
            self._cache[key] = self.breakdown(shape)
        return self._cache[key]["total"]


class Throughput:
    """Wall-clock rates between two log points: step time, tokens/s, audio s/s, MFU."""

    def __init__(self, devices: Sequence[jax.Device]):
        self.devices = list(devices)
        self.reset(0)

    def reset(self, step: int) -> None:
        self.start_time = time.perf_counter()
        self.start_step = step
        self.tokens = 0.0
        self.audio_seconds = 0.0
        self.flops = 0.0

    def add(self, tokens: float, audio_seconds: float, flops: float) -> None:
        self.tokens += tokens
        self.audio_seconds += audio_seconds
        self.flops += flops

    def rates(self, step: int) -> dict[str, float]:
        seconds = max(time.perf_counter() - self.start_time, 1e-9)
        return {
            "step_s": seconds / max(step - self.start_step, 1),
            "tokens_per_s": self.tokens / seconds,
            "audio_s_per_s": self.audio_seconds / seconds,
            "mfu": mfu(self.flops, seconds, self.devices),
        }


def batch_counts(batch: Mapping[str, np.ndarray], sample_rate: int = 16000) -> tuple[float, float]:
    """(real tokens, seconds of audio) in a host batch (padding rows and slots excluded)."""
    tokens = float(np.sum(batch["input_mask"]))
    audio = float(np.sum(batch["audio_lens"])) / sample_rate if "audio_lens" in batch else 0.0
    return tokens, audio
