"""routezoo.layers: dense building blocks, routers, MoE blocks and adapters.

Importing any module of this package imports the three registries' implementations
(:mod:`routezoo.layers.routers`, :mod:`routezoo.layers.moe`, :mod:`routezoo.layers.adapters`),
so ``ROUTERS`` and ``METHODS`` are complete whatever is imported first.
"""

from routezoo.layers import adapters, moe, routers  # noqa: F401  (fills the registries)
