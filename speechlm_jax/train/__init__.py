"""Training: `speechlm-train --config configs/<recipe>.py:<variant> --workdir DIR`.

config.py      config checks (nearest-key errors, value validation, resolved config)
build.py       the SpeechLM of a config, built directly in its shardings
partitions.py  trainable / frozen split, optimiser groups, weight-decay mask, shardings
optimizer.py   clip + AdamW per group with warmup-cosine / warmup-stable-decay schedules
objectives.py  model-aware glue: recipe objective -> chunked pure losses
step.py        the jitted pure step (trainable, frozen, opt_state, batch, rng)
state.py       the run's state: build -> trainable / frozen -> frozen dtype -> shardings
checkpoint.py  orbax checkpoints: trainable, optimiser, rng, data iterator, base hash
metrics.py     TensorBoard, progress bar, FLOP count and MFU
chips.py       accelerator chips: HBM and peak FLOP/s (speechlm-compile, MFU)
data.py        config.data -> this host's Grain iterators
trainer.py     the loop, top to bottom
main.py        the `speechlm-train` command (`--config` and `--config.<key>=value` parsed by config.py)
"""
