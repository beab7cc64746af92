"""``python -m msun`` runs the command line (also under ``torchrun -m msun``)."""

from msun.cli import main

main()
