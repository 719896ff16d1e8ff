"""``python -m gpconv.cli``: the ``gpconv`` command."""

import sys

from . import main

sys.exit(main())
