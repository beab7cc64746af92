"""``python -m ckascope`` runs the command line (also under ``torchrun -m ckascope``)."""

from ckascope.entry import ckascope

ckascope()
