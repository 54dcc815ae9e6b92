"""Pages for people under /ui/: server-rendered shells; the data comes from the JSON API, with the same token.

The HTML and the static files hold no data, so they need no token (the API calls the pages make do). Every
page is sent with a strict Content-Security-Policy: scripts and styles only from this origin, no inline
script, nothing remote. Links are built from the request's `root_path`, so the pages work behind a proxy
that serves the service under a path prefix.
"""

from __future__ import annotations

from typing import Annotated

import jinja2
from fastapi import APIRouter, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from service.ui import STATIC, TEMPLATES

router = APIRouter(include_in_schema=False)

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    # Signed download URLs must not leak to other sites through the Referer header.
    "Referrer-Policy": "no-referrer",
}

_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, undefined=jinja2.StrictUndefined
)


def root_of(request: Request) -> str:
    """The path prefix the service is served under ('' without a proxy), without a trailing slash."""
    return str(request.scope.get("root_path", "")).rstrip("/")


def _page(request: Request, template: str, *, title: str, page: str, **data: str) -> HTMLResponse:
    html = _env.get_template(template).render(root=root_of(request), title=title, page=page, data=data)
    return HTMLResponse(html, headers={**SECURITY_HEADERS, "Cache-Control": "no-cache"})


class UIStatic(StaticFiles):
    """The pages' JavaScript and CSS, with the security headers (nosniff matters for scripts)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]
                message["headers"] = headers
            await send(message)

        await super().__call__(scope, receive, send_with_headers)


static_files = UIStatic(directory=STATIC)


@router.get("/")
def index(request: Request) -> HTMLResponse:
    """A start page linking to the pages and the API docs."""
    return _page(request, "index.html", title="ckpt-service", page="index")


@router.get("/ui")
def ui_redirect(request: Request) -> Response:
    """/ui -> /ui/ (so relative links resolve under it)."""
    return RedirectResponse(f"{root_of(request)}/ui/", status_code=308)


@router.get("/ui/")
def checkpoints_page(request: Request) -> HTMLResponse:
    """The paged list of checkpoints."""
    return _page(request, "checkpoints.html", title="Checkpoints", page="checkpoints")


@router.get("/ui/checkpoints/{ref}")
def checkpoint_page(request: Request, ref: Annotated[str, Path(max_length=200)]) -> HTMLResponse:
    """One checkpoint."""
    return _page(request, "checkpoint.html", title=f"Checkpoint {ref[:16]}", page="checkpoint", ref=ref)


@router.get("/ui/diff")
def diff_page(request: Request) -> HTMLResponse:
    """The diff of two checkpoints (the query names them)."""
    return _page(request, "diff.html", title="Diff", page="diff")


@router.get("/ui/architectures")
def architectures_page(request: Request) -> HTMLResponse:
    """The registered architectures."""
    return _page(request, "architectures.html", title="Architectures", page="architectures")
