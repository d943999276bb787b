"""Who sent a request on the query socket, and how to answer it: what every query handler gets.

    queries: Dispatch[Asker] = Dispatch("query")
    queries.on("nodes", P.Query, self._h_nodes)   # def _h_nodes(msg, body: P.Query, ask)
    ...
    ask.reply({"nodes": [...]})                    # or ask.reply(error=exc), at most once
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .keytable import KeyInfo


class Reply(Protocol):
    """The answer to one request, sent at most once: ``reply(data)`` or ``reply(error=exc)``;
    ``sealed``: readable only with the asker's key (odium.core.sealing)."""

    def __call__(self, data: Any = None, error: Exception | None = None,
                 sealed: bool = False) -> None: ...


@dataclass(frozen=True)
class Asker:
    key: KeyInfo  # the key that signed the request (its role allowed the request's type)
    reply: Reply


__all__ = ["Asker", "Reply"]
