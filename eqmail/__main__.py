"""`python -m eqmail TOOL ...` is the same as `eqmail TOOL ...`."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
