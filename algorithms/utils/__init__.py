"""The toolkit the algorithms are built from: selecting parameters by name and unit, the forward's execution order,
optimizer surgery (remove, add, offload and restore state), fp32 master weights, FSDP2 shards, checkpoint formats and
atomic files.

Modules here may import :mod:`composer_thaw.core` and each other, never an algorithm, a recipe or the CLI
(``tests/test_layout.py``).
"""
