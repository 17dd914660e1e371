"""The hub's web application (Starlette): HTML pages and their JSON twins under ``/api/``.

Read-only (GET only), every page escaped (Jinja2 autoescape; the SVGs escape their own text),
errors answered with a message and no stack trace (the trace goes to the server's log).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import resources
from typing import Any

import jinja2
import markupsafe
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from potluck.errors import PotluckError, UserError
from potluck.hub import evalpages, pages, tensors
from potluck.hub.cache import PageCache
from potluck.hub.pages import Hub, NotFound

log = logging.getLogger(__name__)
HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
Page = Callable[[Hub, Request], dict[str, Any]]


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("potluck.hub", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )
    env.filters["short"] = lambda s: (s or "")[:10]
    env.filters["when"] = lambda t: datetime.fromtimestamp(int(t), UTC).strftime("%Y-%m-%d %H:%M")
    env.filters["num"] = lambda x: "–" if x is None or not math.isfinite(x) else f"{x:.3g}"
    env.filters["svg"] = lambda s: markupsafe.Markup(s)  # built by hub.svg, escaped
    return env


def _int(request: Request, key: str, default: int) -> int:
    raw = request.query_params.get(key, str(default))
    if not raw.isdigit() or len(raw) > 9:
        raise UserError(f"{key} must be a whole number, not {raw[:40]!r}")
    return int(raw)


def _q(request: Request, key: str, default: str | None = None) -> str:
    v = request.query_params.get(key, default)
    if v is None:
        raise UserError(f"missing query parameter {key!r}")
    return v


def _p(request: Request, key: str) -> str:
    return str(request.path_params[key])


PAGES: dict[str, tuple[str, Page]] = {
    "/": ("repos.html", lambda h, r: {"repos": sorted(h.repos)}),
    "/r/{repo}/": ("overview.html", lambda h, r: pages.overview(h, _p(r, "repo"))),
    "/r/{repo}/commits": (
        "commits.html",
        lambda h, r: pages.commits(h, _p(r, "repo"), _int(r, "limit", 100), _int(r, "offset", 0)),
    ),
    "/r/{repo}/commit/{rev:path}": (
        "commit.html",
        lambda h, r: pages.commit(h, _p(r, "repo"), _p(r, "rev")),
    ),
    "/r/{repo}/diff": (
        "diff.html",
        lambda h, r: pages.diff(h, _p(r, "repo"), _q(r, "a"), _q(r, "b")),
    ),
    "/r/{repo}/tensor": (
        "tensor.html",
        lambda h, r: tensors.tensor(h, _p(r, "repo"), _q(r, "rev"), _q(r, "path"), _q(r, "name")),
    ),
    "/r/{repo}/lineage": (
        "lineage.html",
        lambda h, r: evalpages.lineage(h, _p(r, "repo"), _q(r, "rev", "HEAD")),
    ),
    "/r/{repo}/evals": ("evals.html", lambda h, r: evalpages.evals(h, _p(r, "repo"))),
}


def _error(request: Request, exc: Exception, env: jinja2.Environment) -> Response:
    if isinstance(exc, NotFound):
        status = 404
    elif isinstance(exc, UserError):
        status = 400
    else:
        log.error("hub: %s %s failed", request.method, request.url.path, exc_info=exc)
        status = 500
    message = str(exc) if isinstance(exc, PotluckError) and status != 500 else "internal error"
    hint = getattr(exc, "hint", None) if status != 500 else "the server's log has the details"
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message, "hint": hint}, status, headers=HEADERS)
    html = env.get_template("error.html").render(
        status=status, message=message, hint=hint, repo=None
    )
    return HTMLResponse(html, status, headers=HEADERS)


def _endpoint(
    hub: Hub, env: jinja2.Environment, template: str, page: Page, api: bool, cache: PageCache
) -> Any:
    def render(request: Request) -> Response:
        try:
            data = page(hub, request)
        except Exception as exc:
            return _error(request, exc, env)
        if api:
            return JSONResponse(data, headers=HEADERS)
        html = env.get_template(template).render(page=data, repo=data.get("repo"))
        return HTMLResponse(html, headers=HEADERS)

    async def run(request: Request) -> Response:
        key = ("api" if api else "html", request.url.path, request.url.query)
        if cache.due():
            await run_in_threadpool(cache.refresh)
        hit = cache.get(key)
        if hit is not None:
            return Response(hit[0], media_type=hit[1], headers=HEADERS)
        response = await run_in_threadpool(render, request)  # git, numpy, SQL: off the loop
        if response.status_code == 200 and response.media_type:
            cache.put(key, bytes(response.body), response.media_type)
        return response

    return run


def _css(request: Request) -> Response:
    text = resources.files("potluck.hub").joinpath("static/style.css").read_text("utf-8")
    return Response(text, media_type="text/css", headers=HEADERS)


def make_app(hub: Hub) -> Starlette:
    """The ASGI application serving ``hub``."""
    env = _env()
    cache = PageCache(hub.engine)
    routes = [Route("/static/style.css", _css, methods=["GET"])]
    for path, (template, page) in PAGES.items():
        html = _endpoint(hub, env, template, page, False, cache)
        routes.append(Route(path, html, methods=["GET"]))
        api = "/api/" if path == "/" else "/api" + path
        routes.append(Route(api, _endpoint(hub, env, template, page, True, cache), methods=["GET"]))

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error(request, NotFound(f"no page {request.url.path[:200]!r}"), env)

    async def failed(request: Request, exc: Exception) -> Response:
        try:
            return _error(request, exc, env)
        except Exception:
            log.exception("hub: the error page failed")
            return Response("internal error\n", 500, media_type="text/plain", headers=HEADERS)

    return Starlette(
        routes=routes, exception_handlers={404: not_found, 500: failed, Exception: failed}
    )
