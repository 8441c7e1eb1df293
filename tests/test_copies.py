"""models.detached: the plain copies of rows that the hot paths return instead of loading through the ORM."""
from sqlalchemy import inspect

from webapp.extensions import db
from webapp.models import Conversation, Message, User, detached


def test_a_copy_reads_what_it_was_given_and_none_for_the_rest_and_belongs_to_no_session(app):
    with app.app_context():
        message = detached(Message, id=5, conversation_id=7, content="привет", status="complete")
        assert (message.id, message.conversation_id, message.content, message.status) == (5, 7, "привет", "complete")
        assert message.error is None and message.created_at is None  # not given: None, as on a new instance
        user = detached(User, id=3, username="alice", is_active=True)
        assert user.username == "alice" and user.is_authenticated and user.is_admin is None
        for copy in (message, user, detached(Conversation, id=7, title="t")):
            assert inspect(copy).transient and copy not in db.session
        message.content = "changed"  # a copy may be changed like any instance, and stays out of the session
        assert message.content == "changed" and message not in db.session
