"""Operator commands: `flask create-user USERNAME [--admin]`, `flask set-password USERNAME`,
`flask disable-user USERNAME [--enable]`, `flask set-limits USERNAME --max-running N --per-minute M`."""
import sys

import click

from .auth.accounts import AccountError, check_password, create_user, find_user, set_active, set_password


def read_password():
    """At a terminal: ask twice without echo. Otherwise (scripts, containers): one line of stdin."""
    if sys.stdin.isatty():
        return click.prompt("Password", hide_input=True, confirmation_prompt=True)
    line = sys.stdin.readline()
    if not line:
        raise click.ClickException("no password given on standard input")
    return line.rstrip("\r\n")


def register_cli(app):
    @app.cli.command("create-user")
    @click.argument("username")
    @click.option("--admin", is_flag=True, help="Make the user an administrator.")
    def create_user_command(username, admin):
        """Create a user; the password is read from the terminal or standard input."""
        if find_user(username) is not None:
            raise click.ClickException(f"user '{username.strip().lower()}' already exists")
        try:
            user = create_user(username, read_password(), is_admin=admin)
        except AccountError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"created user '{user.username}'{' (admin)' if user.is_admin else ''}")

    @app.cli.command("set-password")
    @click.argument("username")
    def set_password_command(username):
        """Set a user's password (ends their other sessions and tokens)."""
        user = find_user(username)
        if user is None:
            raise click.ClickException(f"no user named '{username.strip().lower()}'")
        try:
            set_password(user, check_password(read_password()))
        except AccountError as exc:
            raise click.ClickException(str(exc)) from None
        click.echo(f"password changed for '{user.username}'")

    @app.cli.command("disable-user")
    @click.argument("username")
    @click.option("--enable", is_flag=True, help="Enable the account again instead.")
    def disable_user_command(username, enable):
        """Disable an account: it cannot sign in, and its sessions, tokens and streams end now."""
        user = find_user(username)
        if user is None:
            raise click.ClickException(f"no user named '{username.strip().lower()}'")
        set_active(user, enable)
        click.echo(f"{'enabled' if enable else 'disabled'} '{user.username}'")

    @app.cli.command("set-limits")
    @click.argument("username")
    @click.option("--key", "key_prefix", default=None,
                  help="Set the limits of this person's API key with this prefix (llmk_…), not the person's.")
    @click.option("--max-running", type=str, default=None,
                  help="Unfinished answers at once (queued ones count); 0 = no limit, 'default' = USER_MAX_RUNNING.")
    @click.option("--per-minute", type=str, default=None,
                  help="Answers started per minute; 0 = no limit, 'default' = USER_MAX_PER_MINUTE.")
    def set_limits_command(username, key_prefix, max_running, per_minute):
        """Override one person's (or one of their API keys') answer limits (until run-time settings
        arrive, this is where)."""
        from .extensions import db
        user = find_user(username)
        if user is None:
            raise click.ClickException(f"no user named '{username.strip().lower()}'")
        target = user if key_prefix is None else _key_of(user, key_prefix)
        for column, value in (("max_running", max_running), ("max_per_minute", per_minute)):
            if value is not None:
                setattr(target, column, _limit_value(value))
        db.session.commit()
        if key_prefix is not None:
            click.echo(f"limits of key {target.prefix}… of '{user.username}': max running "
                       f"{target.max_running if target.max_running is not None else 'the person’s'}, per minute "
                       f"{target.max_per_minute if target.max_per_minute is not None else 'the person’s'}")
            return
        config = app.config

        def shown(value, default):
            return f"{value}" if value is not None else f"default ({default})"
        click.echo(f"limits of '{user.username}': max running "
                   f"{shown(user.max_running, config['USER_MAX_RUNNING'])}, per minute "
                   f"{shown(user.max_per_minute, config['USER_MAX_PER_MINUTE'])} (0 = no limit)")


def _key_of(user, prefix):
    from sqlalchemy import select

    from .extensions import db
    from .models import ApiKey
    keys = db.session.scalars(select(ApiKey).where(ApiKey.user_id == user.id, ApiKey.revoked_at.is_(None),
                                                   ApiKey.prefix.startswith(prefix.strip(), autoescape=True))).all()
    if len(keys) != 1:
        raise click.ClickException(f"'{user.username}' has {len(keys) or 'no'} live keys starting '{prefix}'"
                                   + ("; give more of the prefix" if keys else ""))
    return keys[0]


def _limit_value(value):
    """'default' (or empty) -> None, the configured default; else a whole number >= 0."""
    if value.strip().lower() in ("", "default"):
        return None
    if not (value.strip().isascii() and value.strip().isdigit()):
        raise click.BadParameter(f"'{value}' is not a whole number >= 0 or 'default'")
    return int(value.strip())
