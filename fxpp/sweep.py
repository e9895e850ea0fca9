"""``python -m fxpp.sweep``: the command name of the auto-mapping sweeps, which live in
the testing room (:mod:`fxpp.testing.sweep`)."""

import sys

from .testing.sweep import main

if __name__ == "__main__":
    sys.exit(main())
