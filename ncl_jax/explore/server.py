"""The explorer's web app: one static page and a small JSON API over an :class:`Explorer`.

Routes (all GET; docs/explorer.md documents the answers):

* ``/``, ``/static/app.js``, ``/static/style.css``: the page (plain HTML, CSS and JavaScript
  from this package, no build step).
* ``/api/info``: the model, split and start-up times.
* ``/api/search?q=TEXT&k=10`` (or ``caption=INDEX`` for a caption of the split):
  ``{"plain": [...], "ncl": [...], ...}``.
* ``/api/queries?offset=0&limit=200&contains=&order=index``: the split's captions with their
  ground truth's ranks, the rank distribution and metrics.
* ``/api/hubs?k=20&over=test&order=desc``: videos by summed retrieval probability relative to
  their share, before and after normalization, and the histogram.
* ``/api/thumbnail/{index}``: JPEG of a video's first stored frame (frames mode).

What the page sends is only ever a query text (length-capped), integers and fixed choices: no
file path or code reaches the server. Bad input gets ``{"error": "..."}`` with status 400 (a
:class:`~ncl_jax.errors.UserError`) or 422 (a parameter out of range). Every answer carries a
strict Content-Security-Policy; on a loopback address only ``localhost``/loopback ``Host``
headers are served, so another web site cannot read the API through DNS rebinding.
"""

from __future__ import annotations

import importlib.resources
from typing import Literal

from ncl_jax.errors import UserError

try:
  import fastapi
  from fastapi import responses
  from fastapi.exceptions import RequestValidationError
  from starlette.middleware.trustedhost import TrustedHostMiddleware
except ImportError as err:  # the optional extra is not installed
  raise UserError("the explorer needs FastAPI and uvicorn: pip install 'ncl_jax[explore]'"
                  ) from err

from ncl_jax.explore import core

STATIC_FILES = {"index.html": "text/html; charset=utf-8",
                "app.js": "text/javascript; charset=utf-8",
                "style.css": "text/css; charset=utf-8"}
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; "
                                "img-src 'self'; connect-src 'self'; base-uri 'none'; "
                                "form-action 'none'; frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _static(name: str) -> bytes:
  return importlib.resources.files("ncl_jax.explore").joinpath("static", name).read_bytes()


def _validation_message(err: RequestValidationError) -> str:
  parts = []
  for problem in err.errors():
    where = ".".join(str(p) for p in problem.get("loc", ())[1:]) or "request"
    parts.append(f"{where}: {problem.get('msg', 'invalid')}")
  return "; ".join(parts)


def create_app(explorer: core.Explorer, *, loopback_only: bool = True) -> fastapi.FastAPI:
  """The FastAPI app serving ``explorer``.

  Args:
    explorer: what to serve.
    loopback_only: accept only requests whose Host header is a loopback name (right for a
      server bound to 127.0.0.1; a server on another address takes any Host).
  """
  app = fastapi.FastAPI(title="ncl_jax explorer", docs_url=None, redoc_url=None,
                        openapi_url="/api/openapi.json")
  _add_guards(app, loopback_only)
  _add_page_routes(app)
  _add_api_routes(app, explorer)
  return app


def _add_guards(app: fastapi.FastAPI, loopback_only: bool) -> None:
  """The Host check, the security headers and the JSON answers to bad requests."""
  if loopback_only:
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS))

  @app.middleware("http")
  async def security_headers(request, call_next):
    response = await call_next(request)
    response.headers.update(SECURITY_HEADERS)
    return response

  @app.exception_handler(UserError)
  async def user_error(_request, err: UserError):
    return responses.JSONResponse({"error": str(err)}, status_code=400)

  @app.exception_handler(RequestValidationError)
  async def invalid_parameter(_request, err: RequestValidationError):
    return responses.JSONResponse({"error": _validation_message(err)}, status_code=422)


def _add_page_routes(app: fastapi.FastAPI) -> None:
  """The static page: HTML, script and style sheet, read once (the page never changes)."""
  pages = {name: _static(name) for name in STATIC_FILES}

  def page(name: str) -> responses.Response:
    return responses.Response(pages[name], media_type=STATIC_FILES[name])

  @app.get("/", include_in_schema=False)
  def index():
    return page("index.html")

  @app.get("/static/app.js", include_in_schema=False)
  def script():
    return page("app.js")

  @app.get("/static/style.css", include_in_schema=False)
  def style():
    return page("style.css")

  @app.get("/favicon.ico", include_in_schema=False)
  def favicon():
    return responses.Response(status_code=204)  # no icon; saves the browser a 404


def _add_api_routes(app: fastapi.FastAPI, explorer: core.Explorer) -> None:
  """The JSON API over ``explorer``; FastAPI checks every parameter's range."""

  @app.get("/api/info")
  def info():
    return explorer.info()

  # Plain `def` handlers run in the server's thread pool, so a search does not block the loop.
  @app.get("/api/search")
  def search(q: str | None = fastapi.Query(None, max_length=core.MAX_QUERY_CHARS),
             caption: int | None = fastapi.Query(None, ge=0),
             k: int = fastapi.Query(10, ge=1, le=core.MAX_K)):
    return explorer.search(text=q, caption=caption, k=k)

  @app.get("/api/queries")
  def queries(offset: int = fastapi.Query(0, ge=0),
              limit: int = fastapi.Query(200, ge=1, le=core.MAX_QUERIES_PAGE),
              contains: str = fastapi.Query("", max_length=core.MAX_QUERY_CHARS),
              order: Literal["index", "improved", "worsened"] = "index"):
    return explorer.queries(offset=offset, limit=limit, contains=contains, order=order)

  @app.get("/api/hubs")
  def hubs(k: int = fastapi.Query(20, ge=1, le=core.MAX_K),
           over: Literal["bank", "test"] = "test", order: Literal["desc", "asc"] = "desc"):
    return explorer.hubs(k=k, over=over, order=order)

  @app.get("/api/thumbnail/{index}")
  def thumbnail(index: int):
    if explorer.thumbnails is None or not 0 <= index < explorer.num_videos:
      return responses.JSONResponse({"error": "no such thumbnail"}, status_code=404)
    return responses.Response(explorer.thumbnail(index), media_type="image/jpeg")
