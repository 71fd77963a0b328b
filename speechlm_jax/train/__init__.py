"""Training: `speechlm-train --config configs/<recipe>.py:<variant> --workdir DIR`.

    config.py      config checks (nearest-key errors, value validation, resolved config)
    build.py       the SpeechLM of a config, built directly in its shardings
    partitions.py  trainable / frozen split, optimiser groups, weight-decay mask, shardings
    optimizer.py   clip + AdamW per group with warmup-cosine / warmup-stable-decay schedules
    objectives.py  model-aware glue: recipe objective -> chunked pure losses
    step.py        the jitted pure step (trainable, frozen, opt_state, batch, rng)
    checkpoint.py  orbax checkpoints: trainable, optimiser, rng, data iterator, base hash
    metrics.py     TensorBoard, progress bar, FLOP count and MFU
    data.py        config.data -> this host's Grain iterators
    trainer.py     the loop, top to bottom
    main.py        the argparse CLI (`--config` and `--config.<key>=value` parsed by config.py)
    tiny_corpus.py the TTS corpus of the `:tiny` variants and the tests
"""
