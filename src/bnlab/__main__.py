"""``python -m bnlab``: the command line (what ``torchrun -m bnlab train ...`` runs)."""

import sys

from bnlab.cli import main

sys.exit(main())
