"""Conversion of trained runs to Hugging Face formats (a transformers audio-LLM class, a PEFT adapter).

And back: an HF folder imported into a resumable trainer workdir.
"""
