"""``python -m gmt_align.cli``: what launchers run (``deepspeed --module gmt_align.cli``, ``accelerate launch -m``)."""

import sys

from gmt_align.cli.main import main

sys.exit(main())
