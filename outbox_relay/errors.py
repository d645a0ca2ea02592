"""Exceptions of the relay package; every one derives from ``RelayError``."""


class RelayError(Exception):
    """Root of the relay's exceptions."""


class SettingsError(RelayError):
    """A setting is missing, malformed or unreadable; raised at start-up."""


class PublishError(RelayError):
    """The broker did not confirm a message: refused, returned or timed out.

    ``reason`` is one word from a small fixed set (``returned``, ``nacked``,
    ``timeout``, ``oversize``, ``invalid_headers``, ``channel_closed``), fit
    for a metric label; the message says the rest.
    """

    def __init__(self, message: str, *, reason: str = "error") -> None:
        super().__init__(message)
        self.reason = reason


class ChannelClosedByBrokerError(PublishError):
    """The broker closed the channel while this row's message was unconfirmed.

    Possibly because of this message, possibly because of another one on the
    same channel; only publishing it alone tells which.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="channel_closed")


class BrokerUnavailableError(RelayError):
    """RabbitMQ cannot be reached or the channel broke; no message is to blame."""


class DatabaseUnavailableError(RelayError):
    """PostgreSQL cannot be reached or dropped the connection; worth retrying."""
