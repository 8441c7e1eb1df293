"""The sidebar search: the caller's conversations whose title or finished messages contain a text
(case-insensitive substring), newest first, a page at a time, and it stops as soon as the page is
full. How it stops is written out here, not left to PostgreSQL's planner, whose choice between
"walk the newest chats" and "collect every match, then sort" follows its statistics (at 20,000
messages it collected all 16,000 matches of a common word to show 30 chats):

1. Walk: the newest chats from the cursor on, in batches (the first: as many chats as the page
   needs, or about WALK_MESSAGES messages by their message_count, whichever is less), each chat
   checked by a per-chat subquery that reads its messages newest first on the (conversation_id, id)
   index and stops at the first match (a scalar subquery with LIMIT 1: neither database can turn it
   into a join over all matches). A word in most chats fills the page in the first batch.
2. Probe (PostgreSQL with migration 0003's trigram index), once, when the walk so far says the
   word is too rare for the next batches to fill the page: ask the trigram index for its matching
   messages, at most PROBE_ROWS of them, with sequential and plain index scans switched off for
   that one statement, so the index is used whatever the statistics say. Not more than the cap:
   that is every older match, and one more query takes the newest of those chats (or titles).
3. Otherwise (SQLite; no trigram index; a word in more messages than the cap): keep walking, each
   batch twice the size of the one before, until the page is full or the chats run out.

Cost: a common word, one batch of about a page of chats, a few messages each; a rare word, one
batch (WALK_MESSAGES rows) and an index probe (the word's matches: the index has no order, so a
word in a million messages costs ~0.35 s to collect — that is why the walk goes first); a word
common only in old chats, a walk up to where the page fills — at worst every one of the caller's
messages, which is what the old query did for every rare word on SQLite.
"""
import re

from sqlalchemy import Boolean, Integer, and_, any_, bindparam, func, or_, select, text, true
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal

from ..extensions import db
from ..models import FINAL_STATUSES, Conversation, Message, stored_text

WALK_MESSAGES = 2000   # messages the first walk batch may check (later batches double it)
WALK_MESSAGES_MAX = 48000
WALK_CHATS = 1000      # chats in one batch at most, however short they are; the first batch
                       # has as many as the page needs (a word in every chat fills it at once)
PROBE_ROWS = 3000      # matching messages the trigram probe reads before leaving it to the walk
NEWEST_FIRST = (Conversation.updated_at.desc(), Conversation.id.desc())


def search_conditions(query, scan=False):
    """(title matches, message matches): case-insensitive substring on titles and on finished
    messages. Finished only: that is what PostgreSQL's partial trigram index holds (migration
    0003); a streaming answer is found once it ends. `scan`: the message test is written so that
    no index can serve it (the walk reads one chat's messages by its own index, and must not be
    offered the trigram index per chat, which costs a common word's every match each time)."""
    return contains(Conversation.title, query), (Message.status.in_(FINAL_STATUSES),
                                                 contains(Message.content, query, scan))


def contains(column, query, scan=False):
    """Case-insensitive substring test. PostgreSQL folds every alphabet (Привет finds привет):
    ILIKE, which the trigram index serves, or strpos(lower(…), lower(…)), the same test (ILIKE
    lowers both sides too) that no index serves. SQLite's built-in lower() folds ASCII only, so
    there a non-ASCII search compares through Python's str.lower (the unicode_lower function every
    SQLite connection gets). Which one is decided when the statement is compiled. A NUL becomes
    U+FFFD, as it does in everything stored (models._NoNul; PostgreSQL refuses NUL in text)."""
    return Contains(column, stored_text(query.strip()), scan)


class Contains(ColumnElement):
    inherit_cache = True
    type = Boolean()
    _traverse_internals = [("postgresql", InternalTraversal.dp_clauseelement),
                           ("sqlite", InternalTraversal.dp_clauseelement)]

    def __init__(self, column, needle, scan=False):
        ilike = column.ilike(f"%{escape_like(needle)}%", escape="\\")
        self.postgresql = func.strpos(func.lower(column), func.lower(needle)) > 0 if scan else ilike
        self.sqlite = (ilike if needle.isascii() else
                       func.unicode_lower(column).like(f"%{escape_like(needle.lower())}%", escape="\\"))


@compiles(Contains)
def _contains_anywhere(element, compiler, **kw):
    return compiler.process(element.postgresql, **kw)


@compiles(Contains, "sqlite")
def _contains_sqlite(element, compiler, **kw):
    return compiler.process(element.sqlite, **kw)


def escape_like(text_):
    return text_.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def older_than(key):
    """Conversations after `key` = (updated_at, id) in newest-first order."""
    if key is None:
        return true()
    stamp, last_id = key
    return or_(Conversation.updated_at < stamp, and_(Conversation.updated_at == stamp, Conversation.id < last_id))


def search(user_id, query, after, want, source_filter):
    """The first `want` matching conversations after `after` (a (updated_at, id) key or None),
    newest first. `source_filter`: an extra condition on Conversation, or None."""
    found, budget, chats, probed = [], WALK_MESSAGES, min(want, WALK_CHATS), not _can_probe(query)
    while len(found) < want:
        after, hits, ended = _walk(user_id, query, after, budget, chats, source_filter)
        found += hits
        if ended or len(found) >= want:
            break
        # Probe once, and only when the walk so far says the next two batches (twice and four times
        # as big) will not fill the page: the index's cost is the word's matches, and a common
        # word has many.
        if not probed and 6 * len(found) < want - len(found):
            probed = True
            rest = _probe(user_id, query, after, want - len(found), source_filter)
            if rest is not None:
                return _load(found) + rest  # the probe's chats come loaded: one round trip fewer
        budget, chats = min(budget * 2, WALK_MESSAGES_MAX), min(chats * 2, WALK_CHATS)
    return _load(found[:want])


def _walk(user_id, query, after, budget, chats, source_filter):
    """One batch of the walk, `chats` chats or about `budget` messages, whichever is less: (key of
    the last chat walked, ids of the matching chats in order, whether the caller's chats ended in
    it). Plain rows: a rare word walks many chats, and an ORM object each would cost more than the
    walk itself."""
    title_matches, message_matches = search_conditions(query, scan=True)
    batch = (select(Conversation.id, Conversation.updated_at, Conversation.message_count,
                    func.sum(Conversation.message_count).over(order_by=NEWEST_FIRST, rows=(None, 0))
                    .label("through"), title_matches.label("title_hit"))
             .where(Conversation.user_id == user_id, older_than(after),
                    *([source_filter] if source_filter is not None else []))
             .order_by(*NEWEST_FIRST).limit(chats).subquery())
    # The newest matching message of one chat: a backward range scan of (conversation_id, id)
    # that stops at the first match. Scalar subqueries run per row on both databases.
    first_match = (select(Message.id).where(Message.conversation_id == batch.c.id, *message_matches)
                   .order_by(Message.id.desc()).limit(1).scalar_subquery())
    rows = db.session.execute(
        select(batch.c.id, batch.c.updated_at, batch.c.message_count,
               or_(batch.c.title_hit, first_match.is_not(None)).label("hit"))
        .where(batch.c.through - batch.c.message_count < budget)  # the chat that crosses it is in
        .order_by(batch.c.updated_at.desc(), batch.c.id.desc())).all()
    if not rows:
        return None, [], True
    ended = len(rows) < chats and sum(row.message_count for row in rows) < budget
    return (rows[-1].updated_at, rows[-1].id), [row.id for row in rows if row.hit], ended


def _can_probe(query):
    """The trigram index helps only with a word of three or more letters (with none, pg_trgm would
    read the whole index) and exists only on PostgreSQL with pg_trgm (migration 0003)."""
    if db.engine.dialect.name != "postgresql" or not re.search(r"\w{3}", query):
        return False
    indexed = getattr(db.engine, "_search_trigram_index", None)
    if indexed is None:
        indexed = db.session.scalar(text("SELECT to_regclass('ix_messages_content_trgm') IS NOT NULL"))
        db.engine._search_trigram_index = indexed
    return indexed


def _probe(user_id, query, after, want, source_filter):
    """The newest `want` matching chats after `after`, from the trigram index; None when the word
    has more than PROBE_ROWS matching messages (the walk is then the cheaper way on)."""
    title_matches, message_matches = search_conditions(query)
    saved = db.session.execute(text(
        "SELECT current_setting('enable_seqscan'), current_setting('enable_indexscan'), "
        "set_config('enable_seqscan', 'off', true), set_config('enable_indexscan', 'off', true)")).one()
    # Only bitmap scans are left, and only the trigram index can serve ILIKE '%…%' with one: the
    # probe's cost is the word's matches, whatever the statistics say. Every user's messages are in
    # the index, so the cap counts theirs too (joining the caller's chats here would let the planner
    # walk them instead). The chats are then taken by id or by the title's trigram index, or from
    # the caller's own by their index, never by reading every user's conversations. The settings
    # are local to the transaction (an error rolls them back too) and restored at once.
    # Both statements only ever run under these settings, so a plan psycopg prepares for them
    # (after five runs on a connection; settings do not invalidate cached plans) keeps them.
    matched = db.session.scalars(select(Message.conversation_id).where(*message_matches)
                                 .limit(PROBE_ROWS + 1)).all()
    found = None
    if len(matched) <= PROBE_ROWS:
        found = db.session.scalars(
            select(Conversation)
            .where(Conversation.user_id == user_id, older_than(after),
                   *([source_filter] if source_filter is not None else []),
                   or_(Conversation.id == any_(bindparam("matched", sorted(set(matched)), ARRAY(Integer))),
                       title_matches))
            .order_by(*NEWEST_FIRST).limit(want)).all()
    db.session.execute(text("SELECT set_config('enable_seqscan', :seq, true), "
                            "set_config('enable_indexscan', :idx, true)"), {"seq": saved[0], "idx": saved[1]})
    return found


def _load(ids):
    """The page's conversations, in the order found (one query by primary key)."""
    if not ids:
        return []
    by_id = {c.id: c for c in db.session.scalars(select(Conversation).where(Conversation.id.in_(ids)))}
    return [by_id[i] for i in ids if i in by_id]
