"""Next-scale prediction transformer (VAR) with a KV-cache step API; sampling lives in `samplers/`."""
from var.config import VARConfig, var_config
from var.kv_cache import KVCache
from var.model import VAR

__all__ = ["VAR", "VARConfig", "KVCache", "var_config"]
