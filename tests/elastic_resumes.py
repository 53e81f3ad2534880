"""Run once per test session through Composer's launcher at 2 processes and at 1 (tests/launches.py): the sharded
checkpoints of another world size resumed at this one (conformance/elastic_script.py), into ``<out>/elastic``.

    composer -n N tests/elastic_resumes.py OUT RUNS_FROM MASTERS_FROM
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tests folder

from conformance import elastic_script
from two_processes import run_parts

if __name__ == '__main__':
    out, runs_from, masters_from = map(Path, sys.argv[1:4])
    run_parts(out, {'elastic': lambda folder: elastic_script.main(folder, runs_from, masters_from)})
