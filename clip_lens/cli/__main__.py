"""`python -m clip_lens.cli ...`: the `clip-lens` command."""

import sys

from clip_lens.cli import main

sys.exit(main())
