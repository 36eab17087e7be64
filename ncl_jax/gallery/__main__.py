"""Entry point of ``python -m ncl_jax.gallery`` (see :mod:`ncl_jax.gallery.cli`)."""

from ncl_jax.errors import run_cli
from ncl_jax.gallery.cli import main

if __name__ == "__main__":
  run_cli(main)
