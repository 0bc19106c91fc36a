"""``python -m srpo_infer.cli``: the ``srpo-infer`` command (``python -m srpo_infer`` is the same)."""

import sys

from . import main

sys.exit(main())
