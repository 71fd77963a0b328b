"""Data: audio decoding, sources, tasks, the Grain pipeline, TTS synthesis."""
