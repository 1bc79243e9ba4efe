"""Shared training layer: the accelerate trainer, optimiser recipe, data, run directories, checkpoint I/O,
atomic writes, and the tokenizer and VAR training jobs. Imports only `var/` and `tokenizers/` of ours."""
