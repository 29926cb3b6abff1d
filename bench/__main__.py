"""`python -m bench`: the bench suite (see `suite.py`)."""

import sys

from .suite import main

sys.exit(main())
