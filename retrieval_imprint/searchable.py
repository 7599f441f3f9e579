"""What answers queries, whatever holds the classes: the interface a server (service.py) needs.

``Collection`` (one directory), ``ShardedCollection`` (S of them, merged in process) and
``rayserving.ShardRouter`` (S Ray Serve deployments, merged in the ingress) all implement it, so
one HTTP application serves each of them the same way; ``isinstance(x, Searchable)`` checks the
members are there, a type checker checks their signatures.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .embed import Embedder
    from .ranking import QueryResult


@runtime_checkable
class Searchable(Protocol):
    """Classes to query: ``query`` answers a batch of vectors, ``embedder`` embeds texts with the
    model they were made with, ``refresh`` picks up other processes' writes."""

    @property
    def model(self) -> str | None:
        """The embedding model's name (None: vectors of unknown origin)."""

    @property
    def dimension(self) -> int | None:
        """The vectors' dimension (None before the first add)."""

    @property
    def n_shards(self) -> int:
        """How many shards answer (1 for a plain collection)."""

    def __len__(self) -> int:
        """The number of classes."""

    def info(self) -> dict[str, Any]:
        """Sizes and settings as plain data."""

    def refresh(self) -> bool:
        """Pick up other processes' writes; True if anything changed."""

    def embedder(self, *, progress: bool = False) -> Embedder:
        """The model the classes were embedded with (an error where none is recorded)."""

    def query(
        self,
        Q: Any,
        top: int = 1,
        *,
        threshold: float | None = None,
        model: str | None = None,
        search_params: dict[str, int] | None = None,
    ) -> QueryResult:
        """The ``top`` best classes for each row of ``Q``, best first (``Collection.query``)."""
