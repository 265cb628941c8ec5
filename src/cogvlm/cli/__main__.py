"""`python -m cogvlm.cli`: the `cogvlm` command."""

import sys

from . import main

sys.exit(main())
