"""``python -m subwatch`` is the ``subwatch`` command."""

import sys

from subwatch.cli import main

sys.exit(main())
