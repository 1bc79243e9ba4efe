"""Collaborative decoding (CoDe): the sampler configuration and its fine-tuning jobs."""
