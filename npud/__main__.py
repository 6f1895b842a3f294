"""``python -m npud``: the daemon, as the ``npud`` command runs it."""

import sys

from .main import main

sys.exit(main())
