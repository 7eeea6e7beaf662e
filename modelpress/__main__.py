"""`python -m modelpress ...` (and `torchrun -m modelpress finetune ...`): the command line."""
import sys

from .cli import main

sys.exit(main())
