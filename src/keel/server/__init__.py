"""The server: the REST API under /api/v1, the MLflow-compatible tracking API and
the web UI, in one FastAPI application (`keel server`)."""
