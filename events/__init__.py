"""Delivery of the event outbox: RabbitMQ (AMQP 0-9-1), webhooks and FHIR R4 rest-hooks.

The archive writes one :class:`archive.outbox.OutboxEvent` in the transaction of each change;
the :class:`~events.dispatcher.Dispatcher` (a thread of every process that runs job workers)
delivers them at least once to each subscription, in outbox order for one study, with the
event's stable id for de-duplication. See :mod:`events.envelope` for what a consumer receives.
"""

from events.dispatcher import Dispatcher, RestHookRender
from events.envelope import Envelope, envelope, signature

__all__ = ["Dispatcher", "Envelope", "RestHookRender", "envelope", "signature"]
