"""``python -m structprune.cli``: the same as the ``structprune`` command."""

import sys

from structprune.cli import main

sys.exit(main())
