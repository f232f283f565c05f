"""`flask keys create|list|revoke`: manage API keys (SPEC §7), thin over auth.py."""
import json

import click
from flask.cli import AppGroup

import auth

keys_group = AppGroup("keys", help="Create, list and revoke API keys.")


@keys_group.command("create")
@click.argument("name")
@click.option("--admin", is_flag=True, help="An admin key (default: a submit key).")
@click.option("--rate-limit", help="This key's limit, e.g. 10/second (default: RATE_LIMIT).")
def keys_create(name, admin, rate_limit):
    """Create a key; prints it alone on stdout, the only time it is shown."""
    role = "admin" if admin else "submit"
    try:
        _, secret = auth.create(name, role, rate_limit)
    except auth.KeyRefused as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(secret)
    click.echo(f"created {role} key {name!r}; it is shown only this once", err=True)


@keys_group.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document.")
def keys_list(as_json):
    """Every key, active and revoked (never the keys themselves)."""
    keys = [auth.describe(key) for key in auth.all_keys()]
    if as_json:
        click.echo(json.dumps({"items": keys}, indent=2))
        return
    click.echo(f"{'name':<24} {'role':<7} {'rate limit':<20} {'created':<25} revoked")
    for key in keys:
        click.echo(f"{key['name']:<24} {key['role']:<7} {key['rate_limit'] or 'default':<20} "
                   f"{key['created_at']:<25} {key['revoked_at'] or ''}")


@keys_group.command("revoke")
@click.argument("name")
def keys_revoke(name):
    """Revoke the active key NAME; requests with it get 401 from now on."""
    try:
        auth.revoke(name)
    except auth.KeyRefused as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"key {name} revoked")
