"""`python -m sheafscope` (what torchrun and accelerate launch start)."""

import sys

from sheafscope.cli import main

sys.exit(main())
