"""`ray start --address ...` for a worker node that stays on 127.0.0.1 (infra/local/ray.sh).

Several Ray nodes on one machine is how we emulate a multi-node cluster locally. Ray binds
its daemons to loopback only in its single-machine mode (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0:
every "this node's address" lookup answers 127.0.0.1), but in that mode `ray start` refuses
to add a worker node. With the variable at 1 the node resolves 127.0.0.1 to the machine's
network address and listens on every interface. So this runs Ray's own `ray start` with the
variable at 0 and lifts only that refusal: the start command sees a copy of Ray's constants
in which clusters are enabled; everything else (address resolution included) reads the real
ones. On a real cluster nodes have their own addresses and none of this is needed.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python infra/local/ray_node.py --address=127.0.0.1:P ...
"""

from __future__ import annotations

import os
import sys
import types


def main(argv: list[str]) -> int:
    if os.environ.get("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER") != "0":
        print("ray_node.py: run with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (loopback-only nodes)",
              file=sys.stderr)
        return 2
    import ray._private.ray_constants as constants
    import ray.scripts.scripts as scripts

    view = types.ModuleType("ray_constants_for_start")
    view.__dict__.update(constants.__dict__)
    view.ENABLE_RAY_CLUSTER = True  # read only by `ray start`'s worker-node check
    scripts.ray_constants = view
    return scripts.cli.main(["start", *argv], prog_name="ray", standalone_mode=True)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
