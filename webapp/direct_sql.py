"""The few statements a turn runs alone (extensions.execute_alone), sent by psycopg itself.

On PostgreSQL, SQLAlchemy's Connection costs more CPU than the statement's round trip: checking a
connection out and switching it to autocommit and back, an execution context, result metadata and
event hooks are ~0.2-0.3 ms a statement on a slow core, against ~0.15 ms for psycopg to send the
same statement and read its rows. Here the statement is compiled once (SQLAlchemy's own compiler:
the same SQL) and run on a connection of the same pool (its budget, its idle-ping and reset on
return), its parameters bound by the statement's own types, its rows passed through their types'
result processors. A database error is raised as SQLAlchemy raises it (a DBAPIError subclass,
with `.orig`), and a connection that broke is thrown away, not given back.

What is not taken here, and goes through SQLAlchemy as before: a statement seen for the first time
(one built per call would pay its compilation each time; from the second run of the same object
on, it is compiled and kept), a statement SQLAlchemy completes at execution (a column default or
onupdate computed in Python, an IN-list expanded), and every statement while something listens
to the engine's statements (before/after_cursor_execute: tracing, the tests that count
statements), so they see them all."""
import re
import weakref

from psycopg import RawCursor
from psycopg.rows import namedtuple_row
from sqlalchemy import exc

_seen = weakref.WeakSet()  # statements run once: their next run compiles them here
_plans = weakref.WeakKeyDictionary()  # statement -> _Plan, for the dialect it was compiled for


_UNRESOLVED = object()


class _Plan:
    __slots__ = ("dialect", "compiled", "sql", "names", "binds", "results", "direct")

    def __init__(self, statement, dialect):
        compiled = statement.compile(dialect=dialect)
        self.dialect, self.compiled = dialect, compiled
        self.sql, self.names = _numbered(compiled.string)
        self.binds = compiled._bind_processors  # the types' bind processing, as SQLAlchemy applies it
        self.results = _UNRESOLVED  # the columns' result processors, known at the first run
        # Nothing left for SQLAlchemy to do at execution: no column default or onupdate computed in
        # Python (prefetch), no IN-list expanded.
        self.direct = not (compiled.insert_prefetch or compiled.update_prefetch or compiled.post_compile_params
                           or compiled.literal_execute_params)

    def parameters(self, params):
        values = self.compiled.construct_params(params)
        for name, process in self.binds.items():
            if name in values:
                values[name] = process(values[name])
        return [values[name] for name in self.names]

    def rows(self, cursor):
        if cursor.description is None:
            return []
        if self.results is _UNRESOLVED:
            self.results = self._result_processors(cursor.description)
        rows = cursor.fetchall()
        if self.results is None or not rows:
            return rows
        make = type(rows[0])
        return [make(*[value if process is None else process(value)
                       for value, process in zip(row, self.results, strict=True)]) for row in rows]


    def _result_processors(self, description):
        """What SQLAlchemy applies to each column, given the column's type as the server sent it (a
        numeric's processor depends on it), or None when no column needs one."""
        types = [type_ for *_, type_ in self.compiled._result_columns]
        if len(types) != len(description):  # columns of text: no types known, nothing to apply
            return None
        processors = [type_._cached_result_processor(self.dialect, column.type_code)
                      for type_, column in zip(types, description, strict=True)]
        return processors if any(processors) else None


_PLACEHOLDER = re.compile(r"%%|%\(([^)]+)\)s")


def _numbered(sql):
    """SQLAlchemy's pyformat SQL (%(name)s, %% for %) as PostgreSQL's own $1, $2... and the names in
    their order: psycopg's RawCursor sends it as it is. Its ordinary cursor would convert the SQL on
    every run, and keeps the conversion only for statements under 4 KiB: a turn's start with the
    token's check folded in is longer, and converting it cost 0.1-0.2 ms each time."""
    names = {}

    def number(match):
        if match.group(1) is None:
            return "%"
        return f"${names.setdefault(match.group(1), len(names) + 1)}"
    return _PLACEHOLDER.sub(number, sql), list(names)


def plan_for(engine, statement):
    """The statement's _Plan if it may run here now, else None (see the module docstring)."""
    dispatch = engine.dispatch
    if dispatch.before_cursor_execute or dispatch.after_cursor_execute:
        return None
    try:
        plan = _plans.get(statement)
    except TypeError:  # not weakly referenceable: never kept
        return None
    if plan is None or plan.dialect is not engine.dialect:
        if statement not in _seen:
            _seen.add(statement)
            return None
        plan = _plans[statement] = _Plan(statement, engine.dialect)
    return plan if plan.direct else None


def execute(engine, statement, params, first=None):
    """extensions.execute_alone's statement (and its `first`, when given) run here, when both may
    be (plan_for): the rows; None when not, for the caller to run them through SQLAlchemy."""
    plan = plan_for(engine, statement)
    if plan is None:
        return None
    if first is None:
        return run(engine, plan, params)
    ahead = plan_for(engine, first[0])
    return None if ahead is None else run(engine, plan, params, first=(ahead, first[1]))


def run(engine, plan, params, first=None):
    """Run `plan` with `params` on a pooled connection: in autocommit (one statement, its own
    transaction), or after `first` = (plan, params) in one transaction, `params` then possibly a
    function of `first`'s rows. Returns the rows (named tuples)."""
    fairy = engine.raw_connection()
    connection = fairy.driver_connection
    current = None
    try:
        connection.autocommit = first is None
        with RawCursor(connection, row_factory=namedtuple_row) as cursor:
            if first is not None:
                current = first[0]
                cursor.execute(current.sql, current.parameters(first[1]))
                ahead = current.rows(cursor)
                params = params(ahead) if callable(params) else params
            current = plan
            cursor.execute(plan.sql, plan.parameters(params))
            rows = plan.rows(cursor)
        if first is not None:
            connection.commit()
        connection.autocommit = False
        return rows
    except engine.dialect.loaded_dbapi.Error as error:
        _discard_or_roll_back(fairy, connection, error, engine.dialect)
        raise exc.DBAPIError.instance(current.sql if current else None, params, error,
                                      engine.dialect.loaded_dbapi.Error, dialect=engine.dialect,
                                      connection_invalidated=not fairy.is_valid) from error
    except Exception as error:  # e.g. `params` refused what `first` read: nothing was written
        _discard_or_roll_back(fairy, connection, error, engine.dialect)
        raise
    except BaseException as error:  # killed mid-statement (a greenlet's exit): the connection's state is unknown
        fairy.invalidate(error)
        raise
    finally:
        fairy.close()  # back to the pool, or, invalidated, closed


def _discard_or_roll_back(fairy, connection, error, dialect):
    if isinstance(error, dialect.loaded_dbapi.Error) and dialect.is_disconnect(error, connection, None):
        fairy.invalidate(error)
        return
    try:
        connection.rollback()
        connection.autocommit = False
    except Exception as again:
        fairy.invalidate(again)
