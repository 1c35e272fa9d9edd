"""Typed errors. Every message says what was wrong and how to fix it."""


class MemvisorError(Exception):
    """Base class of every error memvisor raises on purpose."""


class InvalidInput(MemvisorError, ValueError):
    """The caller passed something memvisor cannot accept (empty text, bad date, budget of 0...)."""


class NotFound(MemvisorError, LookupError):
    """An id or namespace that does not exist."""


class UnknownNamespace(NotFound):
    """A namespace with no memories (nothing was ever added to it)."""


class UnknownMemory(NotFound):
    """A memory id that does not exist in the namespace (or was deleted)."""


class KeyConflict(InvalidInput):
    """An idempotency key (``add(key=...)``, an ingested turn's conversation and turn id) already names a memory
    with other content: writing would either lose the new content or duplicate the key, so nothing is written."""


class MalformedFile(InvalidInput):
    """An ingest or import file that cannot be parsed; the message gives the line and the reason."""


class ModelUnavailable(MemvisorError, RuntimeError):
    """A local model package is not installed; the message says which package to install."""
