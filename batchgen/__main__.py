"""``python -m batchgen``: the same command line as the ``batchgen`` script."""

from batchgen.cli import main

main()
