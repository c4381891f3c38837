"""The dashboard: one self-contained page (no CDN, works offline) over the native query API."""

from importlib import resources

from fastapi import APIRouter
from starlette.responses import HTMLResponse, RedirectResponse

router = APIRouter(include_in_schema=False)


def _page() -> str:
    return resources.files("usagemeter.dashboard").joinpath("index.html").read_text("utf-8")


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/dashboard")


@router.get("/dashboard")
def dashboard() -> HTMLResponse:
    return HTMLResponse(_page(), headers={"Cache-Control": "no-cache"})
