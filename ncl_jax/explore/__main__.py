"""Serves the retrieval explorer for a finished training run or an exported bundle.

    python -m ncl_jax.explore --workdir /tmp/ncl_demo
    python -m ncl_jax.explore --bundle /tmp/ncl_bundle --split test --port 8000

Open the printed address in a browser: search the split's videos with plain and NCL-normalized
ranking side by side, look up the test captions' ranks, and see which videos are hubs. The
model, the split's embeddings and the NCL biases are computed once at start-up. The server
listens on 127.0.0.1 (this machine only) unless ``--host`` says otherwise; ``--port 0`` takes
any free port. Needs the optional extra: ``pip install 'ncl_jax[explore]'``.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import pathlib
import socket
import sys
import time

from ncl_jax.errors import UserError, run_cli


DEFAULT_COMPILE_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "ncl_jax", "jax")


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(f"{message} (see --help)")


def parse_args(argv):
  parser = _Parser(prog="python -m ncl_jax.explore", description=__doc__.split("\n\n")[0],
                   formatter_class=argparse.RawDescriptionHelpFormatter,
                   epilog="\n\n".join(__doc__.split("\n\n")[1:]))
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a finished training run (its selected checkpoint)")
  source.add_argument("--bundle", help="a bundle written by tools/export.py")
  parser.add_argument("--split", default="test", help="the split to search (default: test)")
  parser.add_argument("--data_dir", help="prepared data folder (default: the run's)")
  parser.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default 127.0.0.1: this machine only)")
  parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free)")
  parser.add_argument("--compile_cache", default=DEFAULT_COMPILE_CACHE,
                      help="folder of JAX's persistent compilation cache, which makes later "
                           "starts about twice as fast (default %(default)s; 'none' turns it "
                           "off; JAX_COMPILATION_CACHE_DIR, if set, wins)")
  return parser.parse_args(argv)


def use_compile_cache(folder: str) -> None:
  """Turns on JAX's persistent compilation cache in ``folder`` unless the user chose one."""
  if not folder or folder == "none":
    return
  import jax  # pylint: disable=g-import-not-at-top

  if jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR or the user's own code
    return
  jax.config.update("jax_compilation_cache_dir", str(pathlib.Path(folder).expanduser()))
  # The explorer's compilations are all small; by default JAX caches only those over 1 s.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host.strip("[]")).is_loopback
  except ValueError:
    return False


def listen(host: str, port: int) -> socket.socket:
  """A listening TCP socket on ``host:port``, made before the slow start-up so that a port in
  use fails at once; browsers that connect during start-up wait in its backlog."""
  if not 0 <= port <= 65535:
    raise UserError(f"--port must lie in [0, 65535], got {port}")
  try:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
  except socket.gaierror as err:
    raise UserError(f"--host {host!r} is not an address of this machine ({err})") from err
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
  try:
    sock.bind((host, port))
    sock.listen(128)
  except OSError as err:
    sock.close()
    raise UserError(f"cannot listen on {host}:{port} ({err.strerror or err}); the port is in "
                    "use or not allowed: pick another with --port (0 takes any free port)"
                    ) from err
  return sock


def url_of(sock: socket.socket) -> str:
  host, port = sock.getsockname()[:2]
  return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def main(argv=None) -> int:
  started = time.perf_counter()
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from ncl_jax.explore import core  # pylint: disable=g-import-not-at-top

  # Everything that can be checked in a moment fails before the slow start-up.
  if args.workdir is not None:
    core.check_run(args.workdir)
  else:
    core.check_bundle(args.bundle)
  from ncl_jax.explore import server  # pylint: disable=g-import-not-at-top  (needs the extra)
  import uvicorn  # pylint: disable=g-import-not-at-top

  sock = listen(args.host, args.port)
  try:
    use_compile_cache(args.compile_cache)
    explorer = core.open_explorer(
        workdir=args.workdir, bundle_dir=args.bundle, split=args.split, data_dir=args.data_dir,
        progress=lambda message: print(message, file=sys.stderr, flush=True))
    app = server.create_app(explorer, loopback_only=is_loopback(args.host))
    print(f"serving {url_of(sock)} ({explorer.dataset_name} {explorer.split}: "
          f"{explorer.num_videos} videos, {explorer.num_texts} captions; ready in "
          f"{time.perf_counter() - started:.1f} s); Ctrl-C stops", flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
  finally:
    sock.close()
  return 0


if __name__ == "__main__":
  run_cli(main)
