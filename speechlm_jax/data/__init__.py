"""Data: audio decoding and features, sources, tasks, the Grain pipeline, TTS synthesis."""
