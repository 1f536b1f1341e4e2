"""``python -m lmdistill`` (and ``torchrun -m lmdistill``) runs the CLI."""

import sys

from .cli import main

sys.exit(main())
