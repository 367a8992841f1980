"""`python -m upg_batch`: the same as the `upg-batch` command."""

import sys

from upg_batch.cli import main

sys.exit(main())
