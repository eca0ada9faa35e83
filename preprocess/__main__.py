"""`python -m preprocess ...` is `cvtcl-preprocess ...`."""

import sys

from preprocess.cli import main

sys.exit(main())
