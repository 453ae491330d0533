"""python -m fxforge inspect | generate: see fxforge/cli.py."""
import sys

from .cli import main

sys.exit(main())
