"""`/docs`: Swagger UI for the OpenAPI document, served from the package (nudges/api/static/swagger-ui,
vendored with its licence), so the page works offline and never asks a CDN or the online validator."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse

from ...errors import NotFound

router = APIRouter(include_in_schema=False)
ASSETS_DIR = Path(__file__).resolve().parent.parent / "static" / "swagger-ui"
ASSETS = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css", "favicon-32x32.png": "image/png"}
ASSETS_PATH = "/docs/assets"


@router.get("/docs")
async def docs(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}", title=f"{request.app.title}: API",
        swagger_js_url=f"{root}{ASSETS_PATH}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_PATH}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_PATH}/favicon-32x32.png",
        # The online validator badge would send the document's URL to validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None})


@router.get(f"{ASSETS_PATH}/{{name}}")
async def asset(name: str) -> Response:
    media_type = ASSETS.get(name)
    if media_type is None:  # only the named files: no path ever reaches the file system
        raise NotFound(f"no docs asset '{name}'")
    return FileResponse(ASSETS_DIR / name, media_type=media_type, headers={"Cache-Control": "public, max-age=86400"})
