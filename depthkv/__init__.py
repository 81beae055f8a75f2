"""depthkv: layer-dependent KV-cache pruning (DepthKV) for long-context LLMs."""

__version__ = "0.1.0"
