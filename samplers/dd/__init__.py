"""Distilled decoding: the flow map, the student model, its dataset and training job, the sampler."""
