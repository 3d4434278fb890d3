"""The API's interactive documentation (/docs): Swagger UI from the package's own files, never from a CDN.

The bundle is vendored, pinned and unmodified under static/swagger-ui/ (its VERSION file says which release and
how to update it), so /docs renders on a machine without internet, under the same content security policy as every
other page: scripts and styles from this origin only, nothing inline.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse

from app.web.templating import STATIC_DIR

SWAGGER_UI_VERSION = "5.35.0"
DOCS_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_ASSETS = f"/static/swagger-ui/{{name}}?v={SWAGGER_UI_VERSION}"

router = APIRouter(include_in_schema=False)


def docs_page(*, title: str) -> str:
    """The HTML shell: the bundle, its stylesheet and our initializer, all from /static."""
    css, bundle = _ASSETS.format(name="swagger-ui.css"), _ASSETS.format(name="swagger-ui-bundle.js")
    icon = _ASSETS.format(name="favicon-32x32.png")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title} · API</title>
<link rel="icon" type="image/png" href="{icon}">
<link rel="stylesheet" href="{css}">
</head>
<body>
<div id="swagger-ui" data-openapi-url="/openapi.json"></div>
<script src="{bundle}"></script>
<script src="/static/swagger-ui-init.js"></script>
</body>
</html>
"""


@router.get("/favicon.ico")
def favicon() -> FileResponse:
    """The icon browsers ask for on their own (a 404 there is a console error on every page)."""
    return FileResponse(
        STATIC_DIR / "favicon.svg", media_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
    )


@router.get("/docs")
def docs() -> HTMLResponse:
    """Swagger UI for /openapi.json."""
    headers = {"Content-Security-Policy": DOCS_CSP, "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}
    return HTMLResponse(docs_page(title="retrotest"), headers=headers)
