"""Both doors share one turn: the page send costs no more SQL than the API's turn (counted with an
SQLAlchemy event hook on the request's own thread; background generations are not counted)."""
import threading
from contextlib import contextmanager

from sqlalchemy import event

from helpers import both_databases, htmx, login_token, send, wait_idle

pytestmark = both_databases


@contextmanager
def counted(app):
    from webapp.extensions import db
    with app.app_context():
        engine = db.engine
    me, statements = threading.get_ident(), []

    def listener(conn, cursor, statement, *args):
        if threading.get_ident() == me:
            statements.append(statement)
    event.listen(engine, "before_cursor_execute", listener)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", listener)


def test_the_page_send_needs_no_more_sql_than_the_api_turn(app, browser, ollama):
    # The doors' own SQL: the per-person limits' three statements (counted in test_service.py) are off.
    app.config.update(USER_MAX_RUNNING=0, USER_MAX_PER_MINUTE=0)
    ollama.script(reply="ok")
    auth = {"Authorization": f"Bearer {login_token(app.test_client())}"}
    api = app.test_client()
    first = api.post("/chat/", json={"prompt": "start"}, headers=auth).get_json()
    page_first = send(browser, "start")
    page_conversation = int(page_first.headers["Location"].rsplit("/", 1)[1])
    wait_idle(app)

    with counted(app) as api_statements:
        response = api.post("/chat/", json={"prompt": "again", "conversation_id": first["conversation_id"]},
                            headers=auth)
    assert response.status_code == 200
    wait_idle(app)
    with counted(app) as page_statements:
        response = send(browser, "again", page_conversation, **htmx(browser))
    assert response.status_code == 200 and 'class="message user' in response.get_data(as_text=True)
    wait_idle(app)
    # The API's count includes generating the answer in the request (the model queue's admission and
    # the final save); the page renders what the turn returned and follows the answer on its stream.
    assert len(page_statements) <= len(api_statements), (page_statements, api_statements)
    assert len(page_statements) <= 7, page_statements
    print(f"statements: api {len(api_statements)}, page {len(page_statements)}")

