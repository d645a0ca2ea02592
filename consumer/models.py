"""The inbox: one row per message whose effect has been committed."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, Index, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from service.models import Base


class InboxMessage(Base):
    """A message id seen here means its effect is recorded; skip it next time.

    The row is written in the same transaction as the task's outcome, so it
    exists exactly when the outcome does.
    """

    __tablename__ = "inbox"

    message_id: Mapped[str] = mapped_column(Text, primary_key=True)
    routing_key: Mapped[str] = mapped_column(Text)
    processed_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )

    __table_args__ = (Index("ix_inbox_processed_at", "processed_at"),)
