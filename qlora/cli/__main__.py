"""``python -m qlora.cli`` == the ``qlora`` command."""

import sys

from qlora.cli import main

sys.exit(main())
