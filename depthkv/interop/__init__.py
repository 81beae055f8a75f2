"""Bridges between depthkv and other KV-cache compression libraries.

``depthkv.interop.kvpress``: depthkv's per-layer budgets (a calibration profile, or a ratio + allocator, or an
explicit ``Budgets`` vector) as NVIDIA kvpress presses. kvpress itself is imported only when a press is built,
so importing this package never needs it (install with ``pip install 'depthkv[kvpress]'`` in an environment
with transformers < 5.3; ``scripts/kvpress_env.sh`` builds one).
"""

__all__ = ["kvpress"]
