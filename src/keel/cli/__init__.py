"""The `keel` command line: run workflows and inspect what the store recorded.

`main.py` holds the Typer app and the list of commands; each command group lives
in its own module. Only Typer and the standard library are imported at start-up,
so `keel --help` stays fast: the engine, the store and Rich's live display are
imported inside the commands that need them.
"""
