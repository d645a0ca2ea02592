"""Exceptions of the relay package; every one derives from ``RelayError``."""


class RelayError(Exception):
    """Root of the relay's exceptions."""


class SettingsError(RelayError):
    """A setting is missing, malformed or unreadable; raised at start-up."""


class PublishError(RelayError):
    """The broker did not confirm a message: refused, returned or timed out."""


class ChannelClosedByBrokerError(PublishError):
    """The broker closed the channel while this row's message was unconfirmed.

    Possibly because of this message, possibly because of another one on the
    same channel; only publishing it alone tells which.
    """


class BrokerUnavailableError(RelayError):
    """RabbitMQ cannot be reached or the channel broke; no message is to blame."""


class DatabaseUnavailableError(RelayError):
    """PostgreSQL cannot be reached or dropped the connection; worth retrying."""
