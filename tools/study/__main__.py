import sys

from core import errors
from tools.study.cli import main

sys.exit(errors.main(main))  # a user error: one line `error: ...`, exit 2 (--debug: the traceback)
