"""Constants and helpers shared by the server tests (imported by name: tests/server is on
sys.path under pytest's default import mode)."""

API_KEY = "test-key-123"
SEPARATOR = " # # "
DOCS = [
    "Zorblat is a small town in the mountains of Qarth. It is famous for its blue cheese.",
    "The river Ambel flows through Zorblat and into the Lake of Mirrors.",
    "Mira Kessel is the mayor of Zorblat. She was elected in 2019.",
]
