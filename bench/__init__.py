"""exod benchmarks. Each prints one JSON object: python -m bench NAME."""

import os

# Every daemon a benchmark starts (and the `exod start` processes it spawns,
# which inherit the environment) belongs to one cluster: one key per run,
# unless the caller gave one.
if not os.environ.get("EXOD_CLUSTER_KEY"):
    from exod.daemon.keys import new_cluster_key

    os.environ["EXOD_CLUSTER_KEY"] = new_cluster_key()
