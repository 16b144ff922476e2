"""The ML application layer: params, metrics, tags and artifacts logged to runs.

Every workflow run is a tracked run and every step a nested run; `start_run`
opens runs outside any workflow, for notebooks and scripts.
"""
