"""`python -m semid`, e.g. under torchrun: `torchrun --nproc-per-node 8 -m semid train ...`."""
import sys

from semid.cli import main

sys.exit(main())
