"""OpenAI-compatible HTTP serving: ``create_app(engine, settings)`` in ``app`` (FastAPI is
imported only there and in ``cli.run``)."""
