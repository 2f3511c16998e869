"""Constants and helpers shared by the server tests (imported by name: tests/server is on
sys.path under pytest's default import mode)."""

from cacheblend.config import load_config
from cacheblend.engine import Engine
from cacheblend.store.memory import MemoryStore

API_KEY = "test-key-123"
SEPARATOR = " # # "
DOCS = [
    "Zorblat is a small town in the mountains of Qarth. It is famous for its blue cheese.",
    "The river Ambel flows through Zorblat and into the Lake of Mirrors.",
    "Mira Kessel is the mayor of Zorblat. She was elected in 2019.",
]
HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def make_engine(loaded_model, store=None, threads=1, **overrides) -> Engine:
    """An engine over the shared loaded model, with its own store (in memory by default).

    One torch thread: on 2 cores shared with other work, two spinning OpenMP threads are often
    many times slower than one (measured: a 44-token prefill 2.1 s vs 0.14 s under load)."""
    return Engine(
        load_config(None, threads=threads, **overrides),
        store=store or MemoryStore(),
        loaded=loaded_model,
    )


def assert_error(
    response,
    status: int,
    param: str | None = None,
    match: str | None = None,
    code: str | None = None,
) -> dict:
    """``response`` is an OpenAI-style error with this status; returns its ``error`` object."""
    assert response.status_code == status, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    if param is not None:
        assert error["param"] == param, error
    if match is not None:
        assert match.lower() in error["message"].lower(), error
    if code is not None:
        assert error["code"] == code, error
    return error
