"""`python -m preprocess ...` = the `preprocess` console script."""
import sys

from preprocess.cli import main

sys.exit(main())
