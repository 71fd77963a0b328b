"""Decoding throughput: our jitted KV-cache `generate` against transformers `generate`.

Both decode greedily from the same random Llama-family model (4 layers, d_model 512,
vocab 32000 by default): transformers on PyTorch CPU, ours on the default JAX device,
with weights imported from the transformers checkpoint by `load_llm`. A batch of
random prompts (left-padded to a common length) is decoded for exactly
`new_tokens` tokens (no EOS). One warmup run each (our compile happens there) is
excluded; the best of `repeats` timed runs is reported, and whether both produced the
same tokens. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from speechlm_jax.generate import generate
from speechlm_jax.models.hf_import import load_llm


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.d_model,
        intermediate_size=args.d_model * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.prompt + args.new_tokens,
        initializer_range=0.1,
    )
    hf = transformers.LlamaForCausalLM(config).eval()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        ours = load_llm(directory)

    rng = np.random.default_rng(0)
    tokens = rng.integers(3, args.vocab, (args.batch, args.prompt))
    mask = np.ones_like(tokens)
    pad = rng.integers(0, args.prompt // 4, args.batch)
    for row, n in enumerate(pad):
        mask[row, :n] = 0
        tokens[row, :n] = 0

    def run_ours() -> np.ndarray:
        out = generate(ours, tokens, mask, max_new_tokens=args.new_tokens, eos_id=())
        return np.asarray(jax.block_until_ready(out.tokens))

    def run_hf() -> np.ndarray:
        with torch.no_grad():
            out = hf.generate(
                input_ids=torch.tensor(tokens),
                attention_mask=torch.tensor(mask),
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        return out[:, args.prompt :].numpy()

    ours_tokens, hf_tokens = run_ours(), run_hf()
    ours_s = best_time(run_ours, args.repeats)
    hf_s = best_time(run_hf, args.repeats)
    generated = args.batch * args.new_tokens
    result = {
        "benchmark": "decode",
        "device": str(jax.devices()[0].platform),
        "torch_threads": torch.get_num_threads(),
        "layers": args.layers,
        "d_model": args.d_model,
        "vocab": args.vocab,
        "batch": args.batch,
        "prompt": args.prompt,
        "new_tokens": args.new_tokens,
        "ours_s": round(ours_s, 4),
        "transformers_s": round(hf_s, 4),
        "ours_tok_s": round(generated / ours_s, 1),
        "transformers_tok_s": round(generated / hf_s, 1),
        "ratio": round(hf_s / ours_s, 2),
        "tokens_match": bool((ours_tokens == hf_tokens).all()),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
