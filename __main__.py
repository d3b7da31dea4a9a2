"""``python -m hexpr ...`` (and ``torchrun ... -m hexpr ...``): the hexpr command line."""
import sys

from hexpr.pipeline import main

if __name__ == "__main__":
    sys.exit(main())
