"""NCL normalization for large galleries, from embeddings, served from a FAISS index.

* :mod:`ncl_jax.gallery.tiles`: per-tile math (single device, no I/O).
* :mod:`ncl_jax.gallery.solve`: the two entry points: dense biases, sparse top-k biases.
* :mod:`ncl_jax.gallery.dense`: a dense pass on a (bank groups x gallery shards) device mesh.
* :mod:`ncl_jax.gallery.search`: each bank query's top-k items (FAISS exact or ivf).
* :mod:`ncl_jax.gallery.sparse`: the sparse plan and its certificates (worst case, sampled).
* :mod:`ncl_jax.gallery.sparse_mesh`: the sparse plan with its bank rows split over devices.
* :mod:`ncl_jax.gallery.index`: the biases folded into a FAISS inner-product index.
* :mod:`ncl_jax.gallery.inputs`: embedding files: open, check, fingerprint.
* ``python -m ncl_jax.gallery biases|index|search``: the command line (:mod:`.cli`).
"""
