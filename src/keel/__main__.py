"""`python -m keel ...` is the same as the `keel` command."""

from keel.cli.main import main

if __name__ == "__main__":
    main()
