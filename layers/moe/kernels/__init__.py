"""Hand-written kernels (Pallas) for routezoo layers.

* :mod:`routezoo.layers.moe.kernels.gmm_pallas`: dropless grouped matmul ``gmm`` and its
  transpose ``tgmm`` on the Pallas Triton (GPU) backend, runnable on CPU with
  ``interpret=True``;
* :mod:`routezoo.layers.moe.kernels.gmm_mosaic`: jax's Mosaic GPU (Hopper) grouped-matmul
  kernels under routezoo's VJP, pass by pass where they measured faster;
* :mod:`routezoo.layers.moe.kernels.gmm_megablox`: jax's TPU kernels (megablox) under
  routezoo's VJP;
* :mod:`routezoo.layers.moe.kernels.common`: what the wrappers of jax's kernels share.

Submodules are imported lazily (``from routezoo.layers.moe.kernels import gmm_pallas``) so
that importing routezoo never pulls in Pallas.
"""
