import sys

from tools.table.cli import main

sys.exit(main())
