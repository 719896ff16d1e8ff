"""``python -m gpconv``: the ``gpconv`` command."""

import sys

from .cli import main

sys.exit(main())
