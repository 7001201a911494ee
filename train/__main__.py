"""`python -m longtune.train RECIPE [overrides]`: one rank, for torchrun / accelerate / deepspeed."""

import sys

from .commands.train import rank_main

sys.exit(rank_main())
