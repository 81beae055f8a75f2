"""The engine: per-layer physical KV eviction, mask alignment, scoring hooks, chunked prefill."""

from depthkv.engine.cache import PrunedLayer, clone_cache, kv_bytes, kv_bytes_per_sequence, layer_lengths
from depthkv.engine.compressed import CompressedContext, CompressedContextError
from depthkv.engine.press import Compressed, Press, PressConfig, full_kv_bytes, press
from depthkv.engine.runner import ScoredPrefill, chunked_prefill, generate_from_cache, score_prefill
from depthkv.engine.session import Plan, Protection, Session, prune_layer, select_tokens

__all__ = [
    "Compressed", "CompressedContext", "CompressedContextError", "Plan", "Press", "PressConfig", "Protection", "PrunedLayer", "ScoredPrefill", "Session",
    "chunked_prefill", "clone_cache", "generate_from_cache", "full_kv_bytes", "kv_bytes", "kv_bytes_per_sequence", "layer_lengths", "press", "prune_layer",
    "score_prefill", "select_tokens",
]
