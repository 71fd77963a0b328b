"""Evaluation on 8 simulated devices (data x fsdp x tensor) gives the numbers of one device."""

import jax
import numpy as np

from speechlm_jax.data.tasks import get_task
from speechlm_jax.evaluation.items import Item, task_items
from speechlm_jax.evaluation.scoring import Scorer, TTSSpeech
from speechlm_jax.sharding import make_mesh
from speechlm_jax.toyworld.sentences import sentences


def test_eight_devices_match_one(tmp_path, toy_tokenizer, toy_speechlm, toy_downsample):
    assert len(jax.devices()) == 8
    tok = toy_tokenizer(tmp_path / "tok")
    texts = sentences("heldout", 2, seed=5)
    items = task_items(get_task("last_word"), texts, prompt_split="heldout") + [
        Item(id=f"mc{i}", task="mc", question=s, choices=("yes", "no"), answer="yes", prompt="{content} is it true")
        for i, s in enumerate(texts)
    ]
    speech = TTSSpeech()  # espeak-ng: real audio through the encoder and projector
    results = {}
    for name, mesh in (
        ("one", make_mesh({"data": 1}, jax.devices()[:1])),
        ("eight", make_mesh({"data": 2, "fsdp": 2, "tensor": 2})),
    ):
        scorer = Scorer(
            toy_speechlm(tok, seed=1),
            tok,
            downsample=toy_downsample,
            mesh=mesh,
            batch_size=4,
            speech=speech,
            length_multiple=64,
            sample_multiple=64000,
        )
        if name == "eight":
            kernel = scorer.state["llm"]["layers"][0]["mlp"]["up_proj"]["kernel"][...]
            assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
        logliks = scorer.option_logliks(items[2:], ("speech", "text", "text_adapted"))
        answers = scorer.generate_items(items[:2], "speech", max_new_tokens=4)
        divergences = scorer.divergences(
            [scorer.prepare(scorer.segments(it, spoken=True, response="yes")) for it in items]
        )
        results[name] = (logliks, answers, divergences)
    (l1, a1, d1), (l8, a8, d8) = results["one"], results["eight"]
    for condition in l1:
        for a, b in zip(l1[condition], l8[condition]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert a1 == a8 and all(a1)
    # M and F sum differences of near-equal log-probabilities over the vocabulary: another
    # reduction order on the mesh moves them by float32 noise (~1e-6), as it does the logliks.
    for key in d1:
        np.testing.assert_allclose(d1[key], d8[key], rtol=1e-5, atol=1e-5)
    assert d1["misalignment"].sum() > 0 and d1["misalignment_tokens"].sum() > 0
