"""`ray up cluster_configs/local.yaml` for real, against 127.0.0.1 over SSH (slow).

cluster_configs/loopback_sshd.sh installs openssh-server and rsync (apt, as root), makes user
kiln-rayup and runs sshd on loopback only with a generated key. This test derives a config
from local.yaml (head 127.0.0.1, that user and key) and brings the cluster up.
"""

from __future__ import annotations

import os
import shutil

import pytest

REASON = (
    "not run by default: it needs root (apt-get install openssh-server rsync, useradd) and "
    "installs the project into a fresh venv of user kiln-rayup on this machine (torch from "
    "PyPI, minutes); the bring-up over loopback SSH was not finished and verified in issue 6. "
    "Set KILN_TEST_RAY_UP=1 to try it."
)


@pytest.mark.slow
def test_ray_up_local_yaml_over_loopback_ssh():
    if os.environ.get("KILN_TEST_RAY_UP") != "1" or os.geteuid() != 0 or not shutil.which("ssh"):
        pytest.skip(REASON)
    pytest.skip("KILN_TEST_RAY_UP=1: the bring-up steps are not written yet; see " + __file__)
