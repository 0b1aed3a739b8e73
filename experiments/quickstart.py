"""Quick start: trains a phase-collapse net on the digits bundled with scikit-learn (offline).

    python experiments/quickstart.py --workdir=workdirs/quickstart

Rerunning the same command resumes from the last checkpoint in the workdir.
"""

import os

from pcjax import cli

if __name__ == "__main__":
    cli.main(os.path.join(os.path.dirname(__file__), "..", "pcjax", "configs", "digits.py"))
