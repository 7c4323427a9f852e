"""The pieces of the Ray sweep backend that need no cluster: the `resources`
section of a run config, and the per-core claims that pin each run."""

from __future__ import annotations

import os

import ml_collections
import pytest

from ftjax.errors import ConfigError
from ftjax.train.config import RESOURCE_DEFAULTS, run_resources


def test_resources_default_and_validate():
    given = {"cpus": 2, "tpu_version": "v4", "tpu_topology": "2x2x2"}
    cfg = ml_collections.ConfigDict({"resources": given})
    assert run_resources(cfg) == {**RESOURCE_DEFAULTS, **given}
    assert run_resources(ml_collections.ConfigDict()) == RESOURCE_DEFAULTS
    for bad, match in [({"cpu": 1}, r"resources.cpu: unknown field"),
                       ({"cpus": 0}, r"resources.cpus=0; expected a number >= 1"),
                       ({"gpus": -1}, r"resources.gpus=-1; expected a number >= 0"),
                       ({"hosts": True}, r"resources.hosts=True"),
                       ({"tpu_version": "v5p"}, r"a TPU slice needs both")]:  # fmt: skip
        with pytest.raises(ConfigError, match=match):
            run_resources(ml_collections.ConfigDict({"resources": bad}))


def test_core_claims_are_disjoint_and_die_with_their_holder(tmp_path, monkeypatch):
    from ftjax.study import ray_backend

    monkeypatch.setattr(ray_backend, "CORE_LOCKS", str(tmp_path))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    first, fds1 = ray_backend.claim_cores(2)
    second, fds2 = ray_backend.claim_cores(2)
    assert len(first) == len(second) == 2 and not set(first) & set(second)
    for fd in fds1:
        os.close(fd)  # what the end of a task (or its death) does
    third, fds3 = ray_backend.claim_cores(2)
    assert set(third) == set(first)
    for fd in fds2 + fds3:
        os.close(fd)
    assert ray_backend.claim_cores(4) == ([], [])  # a whole node: no pinning needed
