"""The working pages (/app/) and the API docs' assets, served from the package (nothing from a CDN).

* ``GET /app/``: one static shell for every role. The page takes the token from ``#token=...`` (moved to
  sessionStorage and stripped from the address bar at once) or a pasted one, reads its role and shows the
  grid worker's phone page, the handler's workbench or the command centre (supervisor); any other role gets
  a page that says which roles the pages serve. Every action calls the public ``/v1`` API with
  ``Authorization: Bearer``: there is no second write path. The shell holds no data, so it needs no auth.
* ``GET /app/static/{file}``: the page's js/css (an allowlist computed once, no path walking).
* ``GET /docs``, ``GET /redoc``: Swagger UI and ReDoc with their assets from the ``fastapi-offline`` package
  (``/docs/static/{file}``), so the docs work on a machine without internet.
"""
from __future__ import annotations

import mimetypes
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import FileResponse, HTMLResponse

from shared.domain.errors import NotFound

router = APIRouter(include_in_schema=False)

APP_DIR = Path(__file__).parent / "static" / "app"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _files(root: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    if not root.is_dir():
        return {}
    return {p.relative_to(root).as_posix(): p for p in root.rglob("*") if p.is_file() and p.suffix in suffixes}


APP_FILES = _files(APP_DIR, (".js", ".css", ".html", ".svg"))
DOCS_DIR = Path(str(resources.files("fastapi_offline") / "static"))
DOCS_FILES = {n: p for n, p in _files(DOCS_DIR, (".js", ".css", ".png")).items()
              if n in ("swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js", "favicon.png")}


def _asset(files: dict[str, Path], name: str, cache: str) -> Response:
    path = files.get(name)
    if path is None:
        raise NotFound(f"no asset {name!r}")
    media = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if media.startswith("text/") or media.endswith("javascript"):
        media += "; charset=utf-8"
    return FileResponse(path, media_type=media, headers={"Cache-Control": cache})


@router.get("/app/")
async def app_page() -> Response:
    """The shell; the role in the token picks the page (client side, from the same claims the API checks)."""
    page = APP_FILES.get("index.html")
    if page is None:
        raise NotFound("the pages' assets are not installed")
    return FileResponse(page, media_type="text/html; charset=utf-8",
                        headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})


@router.get("/app/static/{name:path}")
async def app_static(name: str) -> Response:
    return _asset(APP_FILES, name, "no-cache")


@router.get("/docs/static/{name}")
async def docs_static(name: str) -> Response:
    if name == "redoc.standalone.js":
        return redoc_js()
    return _asset(DOCS_FILES, name, "public, max-age=86400")


@router.get("/docs")
async def swagger_ui() -> Response:
    return get_swagger_ui_html(openapi_url="/openapi.json", title="needle — API",
                               swagger_js_url="/docs/static/swagger-ui-bundle.js",
                               swagger_css_url="/docs/static/swagger-ui.css",
                               swagger_favicon_url="/docs/static/favicon.png",
                               oauth2_redirect_url="/docs/oauth2-redirect")


@router.get("/docs/oauth2-redirect")
async def swagger_ui_redirect() -> Response:
    return get_swagger_ui_oauth2_redirect_html()


# ReDoc's "API docs by Redocly" badge is an <img> from cdn.redoc.ly: hidden, and its source replaced by an empty
# inline SVG when served (read once), so the docs fetch nothing from outside (offline: no failed request)
REDOC_STYLE = '<style>a[href^="https://redocly.com/redoc"] { display: none; }</style>'
REDOC_LOGO = b"https://cdn.redoc.ly/redoc/logo-mini.svg"
EMPTY_SVG = b"data:image/svg+xml,%3Csvg xmlns='http://www.w3.org/2000/svg'/%3E"
_REDOC_JS: list[bytes] = []


def redoc_js() -> Response:
    if not _REDOC_JS:
        _REDOC_JS.append(DOCS_FILES["redoc.standalone.js"].read_bytes().replace(REDOC_LOGO, EMPTY_SVG))
    return Response(_REDOC_JS[0], media_type="text/javascript; charset=utf-8",
                    headers={"Cache-Control": "public, max-age=86400"})


@router.get("/redoc")
async def redoc() -> Response:
    page = get_redoc_html(openapi_url="/openapi.json", title="needle — API",
                          redoc_js_url="/docs/static/redoc.standalone.js",
                          redoc_favicon_url="/docs/static/favicon.png", with_google_fonts=False)
    html = bytes(page.body).decode().replace("</head>", REDOC_STYLE + "</head>", 1)
    return HTMLResponse(html)
