"""`python -m llama2_hf.annotate ...`: the same as `llama2-hf annotate ...`."""

import sys

from .server import main

sys.exit(main())
