"""Hand-written kernels (Pallas) for routezoo layers.

* :mod:`routezoo.layers.kernels.gmm_pallas`: dropless grouped matmul ``gmm`` and its
  transpose ``tgmm`` on the Pallas Triton (GPU) backend, runnable on CPU with
  ``interpret=True``.

Submodules are imported lazily (``from routezoo.layers.kernels import gmm_pallas``) so
that importing routezoo never pulls in Pallas.
"""
