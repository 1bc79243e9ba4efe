"""The test suite (a regular package, so third-party wheels that ship a top-level `tests` cannot shadow it)."""
