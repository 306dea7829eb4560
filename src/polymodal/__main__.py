"""``python -m polymodal``: the ``polymodal`` command, as ``torchrun -m polymodal train ...`` runs it."""

import sys

from polymodal.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
