"""Liveness and version."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from keel import __version__

router = APIRouter(tags=["server"])


class Health(BaseModel):
    status: str
    version: str


@router.get("/health", response_model=Health)
async def health() -> Health:
    return Health(status="ok", version=__version__)
