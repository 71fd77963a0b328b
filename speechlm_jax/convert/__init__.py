"""Conversion of trained runs to Hugging Face formats (a transformers audio-LLM class, a PEFT adapter) and back into a resumable workdir."""
