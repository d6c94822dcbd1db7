"""Keyset (cursor) pagination over (created_at, id), newest first: stable under inserts."""

from __future__ import annotations

import base64
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, and_, or_
from sqlalchemy.orm import Session

from app.errors import Unprocessable

RowT = TypeVar("RowT")


def encode_cursor(created_at: datetime, row_id: str) -> str:
    return base64.urlsafe_b64encode(f"{created_at.isoformat()}|{row_id}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, row_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
        return datetime.fromisoformat(created), row_id
    except (ValueError, UnicodeDecodeError) as exc:
        raise Unprocessable("invalid cursor: pass the next_cursor of a previous page", {"field": "cursor"}) from exc


def paginate(db: Session, stmt: Select[Any], entity: Any, *, limit: int, cursor: str | None) -> tuple[list[Any], str | None]:
    """Return one page of rows and the cursor of the next page (None on the last)."""
    if cursor:
        created, row_id = decode_cursor(cursor)
        stmt = stmt.where(
            or_(entity.created_at < created, and_(entity.created_at == created, entity.id < row_id))
        )
    rows = list(db.scalars(stmt.order_by(entity.created_at.desc(), entity.id.desc()).limit(limit + 1)))
    if len(rows) <= limit:
        return rows, None
    last = rows[limit - 1]
    return rows[:limit], encode_cursor(last.created_at, last.id)
