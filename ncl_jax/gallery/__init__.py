"""NCL normalization for large galleries, from embeddings, served from a FAISS index.

* :mod:`ncl_jax.gallery.tiles`: per-tile math (single device, no I/O).
* :mod:`ncl_jax.gallery.solve`: biases, dense on a device mesh (across hosts) or sparse top-k.
* :mod:`ncl_jax.gallery.search`: each bank query's top-k items (FAISS exact or ivf).
* :mod:`ncl_jax.gallery.sparse`: the sparse plan and its certified error (the omitted-mass bound).
* :mod:`ncl_jax.gallery.index`: the biases folded into a FAISS inner-product index.
* :mod:`ncl_jax.gallery.inputs`: embedding files: open, check, fingerprint, write safely.
* ``python -m ncl_jax.gallery biases|index|search``: the command line (:mod:`.cli`).
"""
