"""``python -m msun`` runs the command line (also under ``torchrun -m msun``)."""

from msun.entry import main

main()
