"""Picks the session store's backend: `RedisStore` for a Redis URL, else `MemoryStore`.

Its own module so that agent/store.py (the interface every backend implements) imports
neither backend: the backends import the interface, and only this factory knows them both.
Each backend is imported only when chosen (a bridge without `--redis` never loads redis).
"""

from __future__ import annotations

from .store import SessionStore, StoreConfig

__all__ = ["create_store"]


def create_store(redis_url: str | None, config: StoreConfig | None = None) -> SessionStore:
    """The Redis store for a URL, else the in-memory one. Not started."""
    if redis_url:
        from .store_redis import RedisStore

        return RedisStore(redis_url, config)
    from .store_memory import MemoryStore

    return MemoryStore(config)
