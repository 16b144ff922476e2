"""Serving: registered models (and, through the same runner, workflows) answering live
HTTP requests. A face like `cli/` and `server/`: it calls tracking, the store and the
engine; only the CLI and `keel/__init__.py` call it."""
