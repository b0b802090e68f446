"""``python -m sotserve``: the same as the ``sotserve`` command."""

import sys

from sotserve.cli import main

sys.exit(main())
