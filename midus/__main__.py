"""``python -m midus`` runs the kit's CLI."""

from midus.cli import main

if __name__ == "__main__":
    main()
