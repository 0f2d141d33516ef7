"""`python -m engine.planner ...`: the planner's command line (engine/planner/cli.py)."""
import sys

from engine.planner.cli import main

if __name__ == "__main__":
    sys.exit(main())
