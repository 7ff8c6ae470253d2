"""``python -m gmt_align.quickstart [--root DIR]``: build the quickstart model and data once."""

from gmt_align.quickstart import main

main()
