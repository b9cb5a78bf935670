"""Compatibility: the command line moved to ``PancreasC2FLib.apps.cli``."""

from .apps.cli import main  # noqa: F401

if __name__ == "__main__":
    import sys

    sys.exit(main())
