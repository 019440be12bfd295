"""`python -m muscle_kernels.cli`: the same as the `muscle-lora` command."""

import sys

from . import main

sys.exit(main())
