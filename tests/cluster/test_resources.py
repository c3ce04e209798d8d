"""Worker CPUs: the default (one, as Ray Train), and requests the cluster cannot meet."""

import pytest

from kiln.resources import resolve_cpus_per_worker
from kiln.training.errors import KilnError


def test_default_is_ray_trains_one_cpu_per_worker():
    assert resolve_cpus_per_worker(None, 1, [2.0], free_cpus=2.0) == 1
    assert resolve_cpus_per_worker(None, 3, [2.0], free_cpus=1.0) == 1  # waits for CPUs


def test_a_request_that_fits_is_kept():
    assert resolve_cpus_per_worker(2, 2, [4.0], free_cpus=1.0) == 2


@pytest.mark.parametrize(
    ("requested", "workers", "nodes", "fix"),
    [(3, 1, [2.0], 2), (2, 2, [2.0], 1), (4, 2, [4.0, 2.0], 3)],
)
def test_more_than_the_cluster_has_is_one_error_naming_the_fix(requested, workers, nodes, fix):
    with pytest.raises(KilnError, match=f'Got "{requested}" for --cpus-per-worker') as error:
        resolve_cpus_per_worker(requested, workers, nodes, free_cpus=0.0)
    assert f"Use --cpus-per-worker {fix} or fewer" in str(error.value)
