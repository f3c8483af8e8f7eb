"""``python -m flax_minrnn ...``: the :mod:`flax_minrnn.cli` command line."""

import sys

from flax_minrnn.cli import main

if __name__ == "__main__":
    sys.exit(main())
