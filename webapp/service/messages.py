"""Small facts about messages that both doors render, so views need not know the models."""
from ..extensions import db
from ..models import ACTIVE_STATUSES, CANCELLED, COMPLETE, usage_dict

__all__ = ["end_reads", "is_active", "is_answered", "usage_dict"]


def is_active(message):
    """Still being generated (pending or streaming)."""
    return message.status in ACTIVE_STATUSES


def is_answered(message):
    """Ended as the person or program wanted: complete, or stopped on request."""
    return message.status in (COMPLETE, CANCELLED)


def end_reads():
    """End the read transaction so its connection goes back to the pool (long streams call this)."""
    db.session.rollback()
