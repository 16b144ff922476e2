"""Workflow files that tests run in subprocesses (and load again to resume)."""
