"""Serving: registered models and workflows answering live HTTP requests, and batch
inference. A face like `cli/` and `server/`: it calls tracking, the store and the
engine; only the CLI and `keel/__init__.py` call it."""
