"""`python -m npuctl`: the same as the `npuctl` command."""

import sys

from .main import main

sys.exit(main())
