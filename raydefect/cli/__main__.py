"""``python -m raydefect.cli``: the `raydefect` command."""

import sys

from raydefect.cli import main

sys.exit(main())
