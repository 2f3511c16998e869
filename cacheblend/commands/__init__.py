"""CLI subcommands that drive the engine directly (ask, ingest, demo)."""
