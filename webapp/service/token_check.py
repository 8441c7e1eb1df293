"""A bearer token's row check folded into the statement that starts a turn.

The API door checks a JWT's signature and expiry in memory (auth.tokens.Unchecked); its row (the
account active, the token's version, not revoked) is read by answers' one-statement start itself,
which writes only where the row passed, and returns it, so that the door learns who called, or why
not, from the same round trip. On POST /chat/ that is one statement fewer of three.

With both configured limits off (Fold), the row is a CTE of the start and no per-person limit can
apply: a person with limits of their own gets nothing written, and the turn takes the guarded path
with the row as the statement read it. With the limits on (LockedFold), the person's lock comes
first in the start's transaction, as service.fairness's guard has it: the row is read by that same
statement, and the person's limits (their own, or the configured ones) decided from it before the
guarded start runs. Either way the token costs no statement of its own."""
from flask import current_app
from sqlalchemy import Integer, bindparam, exists, func, select

from .. import answers
from ..auth import tokens
from .fairness import GUARDED, USER_LOCK, guard_for


class _TokenSQL:
    """The row check in the shape of answers' guards (as fairness's _GuardSQL): `allowed`, a boolean
    the statement's writes require; `report`, the row (tokens.VERIFIED_COLUMNS) returned; no writes."""

    def __init__(self):
        row = tokens.row_check()
        self.allowed = exists(select(row.c.id).where(
            row.c.is_active, row.c.token_version == bindparam("t_ver", type_=Integer), row.c.revoked_jti.is_(None),
            func.coalesce(row.c.max_running, 0) == 0, func.coalesce(row.c.max_per_minute, 0) == 0))
        self.report = [select(row.c[name]).scalar_subquery() for name in tokens.VERIFIED_COLUMNS]

    def writes(self, done):
        return ()


_FOLDED = {"new": answers.open_new_statement(_TokenSQL()),
           "new_after": answers.open_new_statement(_TokenSQL(), earlier=True),
           "next": answers.open_next_statement(_TokenSQL())}


class Fold:
    """The per-person limits off: what answers' one-statement starts take as `guard`. The folded
    statements, their parameters, and `check(row)`, which accepts the token's row (or raises
    TokenError, saying why not)."""
    statements = _FOLDED
    lock = None

    def __init__(self, credential):
        self.credential = credential
        self.params = {"t_user_id": credential.id, "t_jti": credential.claims["jti"], "t_ver": credential.claims["ver"]}

    def check(self, row):
        self.credential.accept(dict(zip(tokens.VERIFIED_COLUMNS, row, strict=True)))


_LOCK_AND_ROW = answers.lock_with(tokens.row_check())


class LockedFold:
    """The per-person limits on: what answers' one-statement starts take as `guard`. `lock` takes
    the person's lock and reads the token's row; `params(rows)` accepts the row (or raises
    TokenError, which rolls the transaction back) and gives fairness's guard of this person's limits
    (a person whose own limits are both off is counted like the rest); `check(report)` raises its
    refusal."""
    statements = GUARDED

    def __init__(self, credential):
        self.credential = credential
        self.lock = (_LOCK_AND_ROW, {**answers.lock_statement(USER_LOCK, credential.id)[1],
                                     "t_user_id": credential.id, "t_jti": credential.claims["jti"]})
        self._guard = None

    def params(self, rows):
        values = {name: rows[0]._asdict()[name] for name in tokens.VERIFIED_COLUMNS} if rows else None
        user = self.credential.accept(values)
        self._guard = guard_for(user) or guard_for(user, limits=(0, 0))
        return self._guard.params

    def check(self, report):
        self._guard.check(report)


def fold_for(credential):
    """How an unchecked token's start checks its row (a Fold or LockedFold), or None where the row
    must be checked first."""
    if not isinstance(credential.claims.get("ver"), int):  # ours always carry one; else the usual check says no
        return None
    config = current_app.config
    if config["USER_MAX_RUNNING"] or config["USER_MAX_PER_MINUTE"]:
        return LockedFold(credential)
    return Fold(credential)
