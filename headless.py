"""Launcher: ``python <pack folder>/headless.py run|batch ...`` works whatever the folder is called."""
import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from gentor_headless.cli import main

    sys.exit(main())
