"""`python -m attrspace ...` is the `attrspace` command (and `torchrun ... -m attrspace run ...`)."""

import sys

from attrspace.cli.main import main

sys.exit(main())
