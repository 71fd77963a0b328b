"""SALAD stage 2: active selection of targeted synthetic speech (`speechlm-select`).

Stage 1 of SALAD distils the text LLM into its speech-reading self on paired speech
(`configs/salad.py`). Stage 2 spends a small synthetic-speech budget where the model is
most misaligned:

    embed.py     text corpus -> embeddings (the LLM's mean-pooled hidden states, or an HF encoder)
    kmeans.py    balanced k-means on the accelerator -> K clusters of near-equal size
    probe.py     per cluster, TTS probe texts -> misalignment M(c) with the evaluation harness
    sample.py    P(c) ∝ P_web(c) · M(c)^gamma -> texts up to an audio budget
    stage2.py    the selected texts spoken (data.tts) -> the trainer continues the stage-1
                 checkpoint on the stage-1 mixture plus the new speech, lr decaying to 0
    report.py    cluster table (size, M before, share sampled, M after) and plot
    main.py      the `speechlm-select` command, one resumable stage at a time
"""
