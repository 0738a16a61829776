import sys

from clipstore.cli import main

sys.exit(main())
