"""`python -m rlhf_time ...` (what torchrun launches) is the same as `rlhf-time ...`."""

import sys

from rlhf_time.cli import main

sys.exit(main())
