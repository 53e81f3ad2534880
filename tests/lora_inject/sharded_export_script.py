"""Run under ``composer -n 2`` by test_sharded_export.py: LoRAInject under FSDP2 writes its adapter (PEFT format)
and the merged model at FIT_END; every rank takes part in gathering the sharded tensors, rank 0 writes.

Arguments: the output folder (gets ``adapter/`` and ``merged/``).
"""

import sys
from pathlib import Path

from composer.utils.parallelism import FSDP2Config

from lora_inject.test_sharded_export import train_and_export

if __name__ == '__main__':
    train_and_export(Path(sys.argv[1]), parallelism_config={'fsdp': FSDP2Config()})
