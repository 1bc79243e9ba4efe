"""Block-SJD: speculative Jacobi decoding over scales (verification, draft sources, the sampler)."""
