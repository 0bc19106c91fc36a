"""``python -m srpo_infer``: the ``srpo-infer`` command, for launchers that take a module
(``torchrun --nproc-per-node 2 -m srpo_infer generate ... --context-parallel 2``)."""

import sys

from .cli import main

sys.exit(main())
