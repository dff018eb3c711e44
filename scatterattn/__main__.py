"""`python -m scatterattn`: the same as the `scatterattn` command (see scatterattn.cli)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
