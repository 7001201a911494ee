"""The device mesh's process groups keep the run's collective timeout (2 real processes on gloo)."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import free_port, run

pytestmark = pytest.mark.multiproc

WORKER = """
import json, sys
from longtune.parallel.dims import ParallelDims, build_mesh, group_timeout, init_process_group, launched_world

init_process_group(timeout_s=77)
rank, _, world = launched_world()
mesh = build_mesh(ParallelDims(world, dp=1, sp_ring=world), "cpu")
timeouts = {name: group_timeout(mesh.get_group(name), "cpu").total_seconds() for name in mesh.mesh_dim_names}
open(f"{sys.argv[1]}/{rank}.json", "w").write(json.dumps(timeouts))
"""


def test_mesh_groups_get_the_collective_timeout(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         str(worker), str(tmp_path)])
    for rank in (0, 1):
        timeouts = json.loads((tmp_path / f"{rank}.json").read_text())
        # sp_ring spans the world (the default group); the others are new single-rank groups
        assert timeouts == {name: 77.0 for name in ("pp", "dp", "sp_ring", "sp_ulysses", "tp")}
