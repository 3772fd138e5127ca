"""``python -m voxlive`` is the ``voxlive`` command."""

import sys

from .cli import main

sys.exit(main())
