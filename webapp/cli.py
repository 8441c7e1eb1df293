"""Operator commands: `flask create-user USERNAME [--admin]`, `flask set-password USERNAME`,
`flask disable-user USERNAME [--enable]`."""
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
