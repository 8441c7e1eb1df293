"""A bearer token's row check folded into the statement that starts a turn.

The API door checks a JWT's signature and expiry in memory (auth.tokens.Unchecked); its row (the
account active, the token's version, not revoked) is read by answers' one-statement start itself,
which writes only where the row passed, and returns it, so that the door learns who called, or why
not, from the same round trip. On POST /chat/ that is one statement fewer of three.

Only where no per-person limit can apply: both configured limits off (else the limits' guard,
service.fairness, has a lock to take first and needs the person's limits before its statement
runs). A person with limits of their own gets nothing written; the turn then takes the usual path,
with the row as the statement read it."""
from dataclasses import dataclass

from flask import current_app
from sqlalchemy import Integer, bindparam, exists, func, select

from .. import answers
from ..auth import tokens


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


@dataclass(frozen=True)
class Fold:
    """What answers' one-statement starts take as `guard`: the folded statements, their parameters,
    and `check(row)`, which accepts the token's row (or raises TokenError, saying why not)."""
    credential: tokens.Unchecked
    statements = _FOLDED
    lock = None

    @property
    def params(self):
        return {"t_user_id": self.credential.id, "t_jti": self.credential.claims["jti"],
                "t_ver": self.credential.claims["ver"]}

    def check(self, row):
        self.credential.accept(dict(zip(tokens.VERIFIED_COLUMNS, row, strict=True)))


def fold_for(credential):
    """The Fold for an unchecked token's start, or None where its row must be checked first."""
    config = current_app.config
    if config["USER_MAX_RUNNING"] or config["USER_MAX_PER_MINUTE"]:
        return None
    if not isinstance(credential.claims.get("ver"), int):  # ours always carry one; else the usual check says no
        return None
    return Fold(credential)
