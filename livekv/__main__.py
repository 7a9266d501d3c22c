"""``python -m livekv``: the ``livekv`` console script."""

from livekv.cli import main

main()
