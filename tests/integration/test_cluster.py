"""`cluster.address` joins an existing Ray cluster instead of starting the embedded local one."""
import os
import subprocess
import sys

import pytest

from rl.cluster import start_ray
from rl.config import ClusterConfig

RAY = os.path.join(os.path.dirname(sys.executable), "ray")


@pytest.mark.integration
def test_joins_an_existing_cluster(free_port):
    import ray

    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    # A head with resources the embedded default would never create (it makes 2 CPUs per bundle).
    subprocess.run([RAY, "start", "--head", f"--port={free_port}", "--num-cpus=3", "--num-gpus=1",
                    "--resources={\"tandem_marker\": 1}", "--include-dashboard=false", "--disable-usage-stats"],
                   env=env, check=True, capture_output=True, timeout=120)
    try:
        start_ray(ClusterConfig(address=f"127.0.0.1:{free_port}"), num_bundles=1)
        resources = ray.cluster_resources()
        assert resources.get("tandem_marker") == 1 and resources["CPU"] == 3
    finally:
        ray.shutdown()
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
