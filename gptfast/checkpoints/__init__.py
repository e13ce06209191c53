"""Checkpoint formats, all in one place: Hugging Face GPT-2 directories (hf_gpt2), weight-only
int8 directories (quantized), training checkpoints (training_state), and the one loader of
a model and its tokenizer from any of them (loader).

This ``__init__`` imports nothing: ``checkpoints.hf_gpt2`` sits below the model (which reads
and writes that format), the other modules above it.
"""
