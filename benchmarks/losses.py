"""Memory and speed of the chunked and fused KL distillation against the naive full-logits form.

The naive form unembeds student and teacher hidden states into `[batch, seq, vocab]`
float32 logits and calls `kl_distillation`; the chunked form (`chunked_kl_distillation`)
scans over sequence chunks with a rematerialised backward pass; the fused form
(`fused_kl_distillation`) computes the gradients inside its forward scan and only scales
them in the backward pass. All three compute loss and the gradients with respect to the
student hidden states and the unembedding.

Three measurements:
1. Full size (batch x seq = 8192 tokens, Llama-3 vocab 128256, d_model 2048): the three
   programs are compiled, not run (compiling allocates nothing), and XLA's compiled memory
   analysis gives their temporary bytes.
2. Agreement: all three run at `check_tokens` tokens (same vocab and width) and the largest
   absolute difference from the naive form over the loss and every gradient entry is
   reported for each (`max_abs_diff` the chunked form's, `fused_max_abs_diff` the fused one's).
3. CPU step time of the three in the same process at that same reduced size (the full size
   is ~26 TFLOP per step, minutes on a 2-core machine), reported as `timed_tokens`: the
   best of `--repeats` rounds in which the forms take turns.

`fused_time_ratio` is fused / naive step time, `fused_memory_ratio` fused / naive
temporary bytes (`memory_ratio` is chunked / naive). Run from the repository root:
`.venv/bin/python -m benchmarks.losses` (about 5 minutes on 2 CPU cores). The last line
printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp

from speechlm_jax.losses.chunked import chunked_kl_distillation
from speechlm_jax.losses.fused import fused_kl_distillation
from speechlm_jax.losses.reference import kl_distillation

LossFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]


def naive_kl(
    student_hidden: jax.Array, teacher_hidden: jax.Array, unembedding: jax.Array, mask: jax.Array
) -> jax.Array:
    student_logits = jnp.einsum("btd,dv->btv", student_hidden, unembedding)
    teacher_logits = jnp.einsum("btd,dv->btv", teacher_hidden, unembedding)
    return kl_distillation(student_logits, teacher_logits, mask, temperature=2.0)[0]


def chunked_kl(chunk_size: int, form: Callable = chunked_kl_distillation) -> LossFn:
    """The loss of `form` (`chunked_kl_distillation` or `fused_kl_distillation`) with `chunk_size`."""

    def loss(
        student_hidden: jax.Array, teacher_hidden: jax.Array, unembedding: jax.Array, mask: jax.Array
    ) -> jax.Array:
        return form(student_hidden, teacher_hidden, unembedding, mask, chunk_size=chunk_size, temperature=2.0)[0]

    return loss


def differences(want: tuple, got: tuple) -> tuple[float, float]:
    """(|loss difference|, largest |gradient difference|) of two `(loss, grads)` results."""
    (want_loss, want_grads), (got_loss, got_grads) = want, got
    grad_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(want_grads, got_grads))
    return float(jnp.abs(want_loss - got_loss)), grad_diff


def loss_and_grad(fn: LossFn) -> Callable:
    return jax.jit(jax.value_and_grad(fn, argnums=(0, 2)))


def shapes(batch: int, seq: int, d_model: int, vocab: int) -> tuple[jax.ShapeDtypeStruct, ...]:
    return (
        jax.ShapeDtypeStruct((batch, seq, d_model), jnp.float32),
        jax.ShapeDtypeStruct((batch, seq, d_model), jnp.float32),
        jax.ShapeDtypeStruct((d_model, vocab), jnp.float32),
        jax.ShapeDtypeStruct((batch, seq), jnp.float32),
    )


def temp_bytes(fn: LossFn, args: tuple[jax.ShapeDtypeStruct, ...]) -> int:
    return int(loss_and_grad(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes)


def inputs(batch: int, seq: int, d_model: int, vocab: int) -> tuple[jax.Array, ...]:
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    student = jax.random.normal(k1, (batch, seq, d_model), jnp.float32)
    teacher = student + 0.5 * jax.random.normal(k2, (batch, seq, d_model), jnp.float32)
    unembedding = jax.random.normal(k3, (d_model, vocab), jnp.float32) / jnp.sqrt(d_model) * 3.0
    mask = (jax.random.uniform(k4, (batch, seq)) < 0.7).astype(jnp.float32)
    return student, teacher, unembedding, mask


def step_times(steps: dict[str, Callable], args: tuple[jax.Array, ...], repeats: int) -> tuple[dict, dict]:
    """Best wall time and result of each compiled step, the forms taking turns in every round.

    On a shared machine the load changes from minute to minute; interleaving the forms
    (rather than timing one form's repeats, then the next's) exposes each to the same load.
    """
    results = {name: jax.block_until_ready(step(*args)) for name, step in steps.items()}
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            results[name] = jax.block_until_ready(step(*args))
            best[name] = min(best[name], time.perf_counter() - start)
    return best, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--d-model", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--check-batch", type=int, default=1)
    parser.add_argument("--check-seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    jax.config.update("jax_default_matmul_precision", "highest")

    full = shapes(args.batch, args.seq, args.d_model, args.vocab)
    forms = {
        "naive": naive_kl,
        "chunked": chunked_kl(args.chunk_size),
        "fused": chunked_kl(args.chunk_size, fused_kl_distillation),
    }
    temp = {name: temp_bytes(fn, full) for name, fn in forms.items()}
    print("full size temp bytes: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in temp.items()), flush=True)

    small = inputs(args.check_batch, args.check_seq, args.d_model, args.vocab)
    seconds, results = step_times({name: loss_and_grad(fn) for name, fn in forms.items()}, small, args.repeats)
    loss_diff, grad_diff = differences(results["naive"], results["chunked"])
    fused_loss_diff, fused_grad_diff = differences(results["naive"], results["fused"])
    print(
        f"at {args.check_batch}x{args.check_seq} tokens: " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()),
        flush=True,
    )
    naive_temp, chunked_temp, fused_temp = temp["naive"], temp["chunked"], temp["fused"]
    naive_s, chunked_s, fused_s = seconds["naive"], seconds["chunked"], seconds["fused"]
    naive_loss = results["naive"][0]

    print(
        json.dumps(
            {
                "benchmark": "chunked_kl_distillation",
                "tokens": args.batch * args.seq,
                "batch": args.batch,
                "seq": args.seq,
                "vocab": args.vocab,
                "d_model": args.d_model,
                "chunk_size": args.chunk_size,
                "grads_wrt": ["student_hidden", "unembedding"],
                "naive_temp_bytes": naive_temp,
                "chunked_temp_bytes": chunked_temp,
                "memory_ratio": chunked_temp / naive_temp,
                "check_tokens": args.check_batch * args.check_seq,
                "loss": float(naive_loss),
                "loss_abs_diff": loss_diff,
                "grad_max_abs_diff": grad_diff,
                "max_abs_diff": max(loss_diff, grad_diff),
                "timed_tokens": args.check_batch * args.check_seq,
                "naive_step_s": naive_s,
                "chunked_step_s": chunked_s,
                "chunked_time_ratio": chunked_s / naive_s,
                "fused_temp_bytes": fused_temp,
                "fused_memory_ratio": fused_temp / naive_temp,
                "fused_loss_abs_diff": fused_loss_diff,
                "fused_grad_max_abs_diff": fused_grad_diff,
                "fused_max_abs_diff": max(fused_loss_diff, fused_grad_diff),
                "fused_step_s": fused_s,
                "fused_time_ratio": fused_s / naive_s,
                "backend": jax.default_backend(),
                "devices": jax.device_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
