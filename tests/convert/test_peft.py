"""LoRA kept as a PEFT adapter: `peft` loads it onto the exported base and equals the merged export."""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
import transformers
from flax import nnx

from speechlm_jax.convert import export, peft_adapter, voxtral
from speechlm_jax.models.hf_import import load_llm
from speechlm_jax.models.lora import LoRAConfig, apply_lora

TOKENS = np.array([[1, 5, 9, 11, 7, 30, 12, 3]], np.int32)


def test_adapter_on_the_base_llm_equals_the_merged_export(tiny_speechlm, tmp_path):
    llm = tiny_speechlm("llama").llm
    base_dir = export.export_llm(llm, tmp_path / "base")
    merged_dir = export.export_llm(llm, tmp_path / "merged", merge_lora=True)

    config = json.loads((base_dir / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0
    assert config["base_model_name_or_path"] == str(base_dir)
    assert "model.layers.1.mlp.down_proj" in config["target_modules"] and len(config["target_modules"]) == 14

    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir).eval()
    with torch.no_grad():
        plain = base(torch.tensor(TOKENS)).logits.numpy()
    adapted = peft.PeftModel.from_pretrained(base, base_dir / "adapter").eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    with torch.no_grad():
        with_adapter = adapted(torch.tensor(TOKENS)).logits.numpy()
        reference = merged(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(with_adapter, reference, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(llm(TOKENS)), with_adapter, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(llm(TOKENS, lora=False)), plain, atol=1e-4, rtol=0)
    assert np.abs(with_adapter - plain).max() > 1e-2, (
        "the adapter changed nothing: the test would not see a wrong mapping"
    )


def test_adapter_on_the_voxtral_base_equals_the_merged_voxtral(
    tiny_speechlm, tokenizer_dir, clip, prompt_batch, hf_inputs, load_voxtral, tmp_path
):
    model = tiny_speechlm("qwen2")
    tokenizer = tokenizer_dir(tmp_path)
    base_dir = export.export_speechlm(model, tmp_path / "base", audio_token_id=4, tokenizer_dir=tokenizer)
    merged_dir = export.export_speechlm(
        model, tmp_path / "merged", audio_token_id=4, tokenizer_dir=tokenizer, merge_lora=True
    )
    inputs = hf_inputs(base_dir, prompt_batch(tokenizer, clip), clip)
    adapted = peft.PeftModel.from_pretrained(load_voxtral(base_dir), base_dir / "adapter").eval()
    with torch.no_grad():
        with_adapter = adapted(**inputs).logits.numpy()
        reference = load_voxtral(merged_dir)(**inputs).logits.numpy()
    np.testing.assert_allclose(with_adapter, reference, atol=1e-4, rtol=0)


def test_adapter_reads_back_into_our_lora(tiny_speechlm, tmp_path):
    llm = tiny_speechlm("llama").llm
    out = export.export_llm(llm, tmp_path / "base")
    fresh = load_llm(out)
    assert (
        peft_adapter.read_adapter(out / "adapter", fresh, module_name=peft_adapter.causal_lm_module, rngs=nnx.Rngs(0))
        == 14
    )
    np.testing.assert_array_equal(np.asarray(fresh(TOKENS)), np.asarray(llm(TOKENS)))


def test_adapters_with_different_ranks_must_be_merged(tiny_speechlm, tmp_path):
    model = tiny_speechlm("llama", lora=False)
    apply_lora(model.llm, LoRAConfig(rank=4, alpha=8.0, targets=r"q_proj$"), rngs=nnx.Rngs(1))
    apply_lora(model.llm, LoRAConfig(rank=2, alpha=8.0, targets=r"v_proj$"), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="different \\(rank, alpha\\) pairs"):
        export.export_llm(model.llm, tmp_path / "llm")
    assert not (tmp_path / "llm").exists()
    export.export_llm(model.llm, tmp_path / "llm", merge_lora=True)


def test_encoder_adapters_are_only_exported_merged(tiny_speechlm, tmp_path):
    model = tiny_speechlm("llama")
    apply_lora(model.encoder, LoRAConfig(rank=2, alpha=4.0, targets=r"q_proj$"), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="encoder has LoRA adapters"):
        export.export_speechlm(model, tmp_path / "hf", audio_token_id=4)
    assert (
        voxtral.in_memory_module("model.layers.0.self_attn.q_proj.weight")
        == "model.language_model.layers.0.self_attn.q_proj"
    )
