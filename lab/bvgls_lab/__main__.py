"""``python -m bvgls_lab ...`` is the ``bvgls-lab`` command."""

from .cli import main

if __name__ == "__main__":
    main()
