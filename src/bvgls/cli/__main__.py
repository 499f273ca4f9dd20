"""`python -m bvgls.cli ...` is the `bvgls` command."""

from . import main

if __name__ == "__main__":
    main()
