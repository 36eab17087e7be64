"""A retrieval explorer in the browser: search a trained model, plain vs NCL, and see its hubs.

``python -m ncl_jax.explore (--workdir RUN | --bundle DIR) [--split test]`` serves a local web
page (see docs/explorer.md). :mod:`ncl_jax.explore.core` computes what the page shows, without
web code; :mod:`ncl_jax.explore.server` is the FastAPI app (the optional extra
``ncl_jax[explore]``); ``__main__`` is the command line.
"""
