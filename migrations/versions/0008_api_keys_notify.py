"""A notification whenever stored API keys change, for the API's key cache.

The API keeps the principals of keys it has checked for a short while (see
``service.key_cache``) and drops them all when this notification arrives, so
a revoked key is refused on every replica as soon as the revoking
transaction commits. One notification per statement, whatever it touched:
keys change rarely, and a cache emptied too often costs a lookup per key.
Inserting a key needs none; a key nobody has presented is in no cache.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

#: The channel ``service.key_cache`` listens on.
CHANNEL = "api_keys_changed"


def upgrade() -> None:
    op.execute(
        f"""
        CREATE FUNCTION api_keys_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', '');
            RETURN NULL;
        END $$
        """
    )
    # TRUNCATE too: a table emptied by hand must not leave keys answering.
    op.execute(
        """
        CREATE TRIGGER api_keys_notify AFTER UPDATE OR DELETE OR TRUNCATE
        ON api_keys FOR EACH STATEMENT EXECUTE FUNCTION api_keys_notify()
        """
    )


def downgrade() -> None:
    op.execute("DROP TRIGGER api_keys_notify ON api_keys")
    op.execute("DROP FUNCTION api_keys_notify()")
