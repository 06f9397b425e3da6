"""`python -m pcc.compiler` is the `pcc` command."""

import sys

from pcc.compiler.cli import main

sys.exit(main())
