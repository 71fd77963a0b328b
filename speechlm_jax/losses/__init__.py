"""The objectives of every recipe, and SALAD's diagnostics, as pure functions of arrays.

Where this sits in the data flow: the jitted step runs the student (LoRA on, speech input)
and the teacher (LoRA off, the text twin), then `train/objectives.py` hands arrays to one
of these functions: final hidden states and the unembedding (or logits), the batch's
`targets`, `loss_mask`, `kl_mask`, `teacher_index` and `weight`; evaluation
(`evaluation/scoring.py`) calls the same functions. Nothing here sees a model, a config or
a global, so every function is safe under `jax.jit` and `jax.grad`.

The modules (import each name from the module that defines it):

    fused          what the trainer runs: cross-entropy, KL distillation and SALAD's
                   objective from `[batch, seq, d_model]` hidden states, `[batch, chunk,
                   vocab]` logits at a time, the gradients made in the forward pass
                   (custom VJP) so that no chunk's logits are computed twice
    chunked        the same losses with a rematerialised backward pass (the fused forms'
                   no-gradient path), and SALAD's misalignment / forgetting diagnostics,
                   which evaluation runs
    reference      the same objectives from whole `[batch, seq, vocab]` logits, plus
                   behaviour imitation on a placed teacher response: the definitions the
                   tests and `benchmarks/losses.py` compare the fused and chunked forms against
    ctc            CTC of audio frames against their transcript, and its greedy decoding
    hidden_states  DiVA's mean-squared-error terms between hidden states or embeddings
    common         what they share: `gather_teacher`, the weighted mean, the per-token
                   cross-entropy parts and divergences, the metrics, the bf16 tolerance

Conventions shared by every function:
- Shapes: logits `[batch, seq, vocab]`; `targets` `[batch, seq]` hold the token predicted at
  position t (already shifted), any value at unsupervised positions; masks are float
  `[batch, seq]` (1 = supervised); `weights` `[batch]` per example (None = all ones, 0 for
  padding rows).
- The mean: loss = sum_{b,t} w_b m_bt l_bt / sum_{b,t} w_b m_bt, a mean over supervised
  tokens in which each token counts with its example's weight (a long answer counts more
  than a short one; a weight-2 example counts twice). An all-zero mask gives 0, not NaN.
  Values at positions with zero weight never reach the loss (not even inf/NaN), and finite
  values there get exactly zero gradient.
- Log-softmax runs in float32 whatever the input dtype: bf16 logits are upcast first
  (float64 inputs, used by the gradient checks, stay float64).
  With bf16 logits (or bf16 hidden states and unembedding in the fused and chunked forms) the losses
  stay finite and lie within `BF16_ATOL + BF16_RTOL * |loss|` (`common`) of the float32
  computation on the same unrounded values (the error is the bf16 rounding of the logits
  themselves).
- The teacher is always under `stop_gradient`. Teacher logits or hidden states must
  already sit at the student's positions: `gather_teacher(x, batch["teacher_index"])`.
- Each function returns `(scalar loss, metrics)`, metrics a dict of float32 scalars
  (per-part losses, `tokens` = number of supervised positions with non-zero weight); the
  diagnostics `misalignment` / `forgetting` add per-sequence `[batch]` arrays.
"""
