"""A throwaway local Valkey/Redis server for tests in any folder.

The implementation lives in ``cacheblend.store.valkey_server`` (``bench store`` uses it too);
this module re-exports it for tests. Typical use, as a session fixture::

    @pytest.fixture(scope="session")
    def valkey_server():
        try:
            server = ValkeyServer()
        except FileNotFoundError as exc:
            pytest.skip(str(exc))
        with server:
            yield server
"""

from cacheblend.store.valkey_server import ValkeyServer, find_server_binary, free_port, ping

__all__ = ["ValkeyServer", "find_server_binary", "free_port", "ping"]
