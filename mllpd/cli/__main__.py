"""``python -m mllpd.cli``: the same as the ``mllp-cli`` console script."""

import sys

from mllpd.cli import main

sys.exit(main())
