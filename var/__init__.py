"""Next-scale prediction transformer (VAR) with a static KV-cache step API; sampling lives in `samplers/`."""
from var.compile import compile_blocks
from var.config import VARConfig, var_config
from var.kv_cache import KVCache
from var.model import VAR

__all__ = ["VAR", "VARConfig", "KVCache", "compile_blocks", "var_config"]
