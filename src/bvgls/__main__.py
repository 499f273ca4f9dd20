"""`python -m bvgls ...` is the `bvgls` command."""

from .cli import main

if __name__ == "__main__":
    main()
