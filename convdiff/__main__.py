"""``python -m convdiff`` runs the command line."""

from convdiff.cli import main

main()
