"""`python -m longtune.train RECIPE [overrides]`: one rank, for torchrun / accelerate / deepspeed."""

import sys

from .cli import worker_main

sys.exit(worker_main())
