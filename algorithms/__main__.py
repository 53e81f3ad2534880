"""``python -m composer_thaw``: the ``thaw`` command (:mod:`composer_thaw.cli`)."""

import sys

from composer_thaw.cli import main

if __name__ == '__main__':
    sys.exit(main())
