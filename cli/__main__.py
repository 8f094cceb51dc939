"""`python -m cli serve|generate ...`: the `neoserve` command without the installed script."""

import sys

from cli.main import main

sys.exit(main())
