"""Dependencies shared by the routers: settings, a database session, the calling tenant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from app.db.models import DEFAULT_TENANT
from app.db.session import get_sessionmaker
from app.settings import Settings, get_settings


def _session() -> Iterator[Session]:
    session = get_sessionmaker()()
    try:
        yield session
    finally:
        session.close()


def _tenant() -> str:
    # One local tenant until API keys arrive; every service call already takes the tenant.
    return DEFAULT_TENANT


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(_session)]
TenantDep = Annotated[str, Depends(_tenant)]
