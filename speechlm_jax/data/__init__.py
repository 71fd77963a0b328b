"""Data: audio decoding, sources, tasks, the Grain pipeline (config, mixture, maker, batching), TTS, spoken corpora."""
