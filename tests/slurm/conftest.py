"""The Slurm cluster the tests in this folder submit to (see ``cluster.py``): started once a session,
skipped with the reason where this machine cannot run one (not root, packages not installable)."""

from __future__ import annotations

import pytest

from cluster import ClusterUnavailable, SlurmCluster


@pytest.fixture(scope="session")
def slurm_cluster():
    cluster = SlurmCluster(nodes=2)
    try:
        cluster.start()
    except ClusterUnavailable as reason:
        cluster.stop()
        pytest.skip(f"no Slurm cluster here: {reason}")
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()
