"""Run once per test session by two Composer launchers of 2 processes each, as two nodes of one run (``composer
--world_size 4 --nproc 2 --node_rank {0,1} --master_addr 127.0.0.1 ...``; tests/launches.py), after the 2-process
launch whose checkpoints it resumes:

* ``<out>/hsdp``: the conformance suite under hybrid sharding, 2 replicas x 2 shards (conformance/hsdp_script.py);
* ``<out>/elastic``: the 2-process launch's sharded checkpoints resumed at 4 processes, and each last example run
  straight at 4, saving the checkpoints that the 2-process elastic launch resumes (conformance/elastic_script.py).

As in tests/two_processes.py, a part that raises writes its traceback to ``<out>/<part>/error-rank<r>.txt``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the tests folder

from conformance import elastic_script, hsdp_script
from two_processes import run_parts


def main(out: Path, two_processes: Path) -> None:
    sharded = two_processes / 'fsdp2' / 'sharded-checkpoints'
    run_parts(
        out,
        {
            'hsdp': hsdp_script.main,
            'elastic': lambda folder: elastic_script.main(
                folder, sharded / 'sharded', sharded / 'master-weights', save_to=folder / 'checkpoints'
            ),
        },
    )


if __name__ == '__main__':
    main(Path(sys.argv[1]), Path(sys.argv[2]))
