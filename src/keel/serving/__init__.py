"""Serving: registered models and workflows answering live requests, and batch inference."""
