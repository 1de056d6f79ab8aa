"""A script for launch tests: ``python tests/fabric_workers/launch_script.py ok|raise|litmodel|kill``.

``ok`` reports each rank's place and an all-reduce (run it under torchrun to test joining a group);
the other modes make rank 1 fail while rank 0 waits in a collective: the launch must stop, not hang.
"""

import os
import sys
import time

from litmodel.cli import cli_main
from litmodel.fabric import Fabric
from litmodel.utils import LitModelError


def work(fabric: Fabric, mode: str) -> str:
    fabric.barrier()
    if mode == "ok":
        total = fabric.all_reduce(fabric.global_rank + 1.0, op="sum").item()
        print(f"rank {fabric.global_rank}/{fabric.world_size} local {fabric.local_rank} node {fabric.node_rank} "
              f"sum={total}", flush=True)
        return f"result of rank {fabric.global_rank}"
    if fabric.global_rank == 1:
        if mode == "raise":
            raise ValueError("boom on rank 1")
        if mode == "litmodel":
            raise LitModelError("bad input; fix it")
        os.kill(os.getpid(), 9)
    fabric.barrier()  # rank 0 would wait here forever without the launcher's supervision
    time.sleep(120)


@cli_main
def main() -> None:
    result = Fabric(accelerator="cpu", devices=2).launch(work, sys.argv[1])
    print(f"launch returned: {result}", flush=True)


if __name__ == "__main__":
    main()
