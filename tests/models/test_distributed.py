"""Multi-process settings and the host-side helpers as they behave in one process.

The multi-process behaviour itself is checked end to end in tests/experiments/test_multihost.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from models import distributed
from models.distributed import DistributedSetupError, env_settings
from models.sharding import make_mesh

FULL = {"METAJUDGE_COORDINATOR": "10.0.0.2:8476", "METAJUDGE_NUM_PROCESSES": "4", "METAJUDGE_PROCESS_ID": "3"}


def test_all_three_variables_give_the_settings_and_none_gives_a_single_process():
    assert env_settings(FULL) == ("10.0.0.2:8476", 4, 3)
    assert env_settings({}) is None
    assert env_settings({"METAJUDGE_PROCESS_ID": "  "}) is None  # blank counts as unset


@pytest.mark.parametrize("drop", [["METAJUDGE_NUM_PROCESSES"], ["METAJUDGE_COORDINATOR", "METAJUDGE_PROCESS_ID"]])
def test_a_partial_setting_names_the_missing_variables(drop):
    env = {k: v for k, v in FULL.items() if k not in drop}
    with pytest.raises(DistributedSetupError, match=f"{', '.join(drop)} (is|are) not"):
        env_settings(env)


@pytest.mark.parametrize("key, value, message", [
    ("METAJUDGE_COORDINATOR", "10.0.0.2", "expected host:port"),
    ("METAJUDGE_COORDINATOR", "host:http", "expected host:port"),
    ("METAJUDGE_NUM_PROCESSES", "two", "must be integers"),
    ("METAJUDGE_PROCESS_ID", "4", r"must be in \[0, METAJUDGE_NUM_PROCESSES=4\)"),
])
def test_invalid_values_are_refused_with_the_rule(key, value, message):
    with pytest.raises(DistributedSetupError, match=message):
        env_settings(dict(FULL, **{key: value}))


def test_without_settings_nothing_is_started():
    assert distributed.initialize({}) is False
    assert not distributed.is_initialized() and distributed.process_count() == 1 and distributed.is_primary()


def test_single_process_helpers_are_plain_host_operations():
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    rows = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
    x = np.arange(24, dtype=np.int32).reshape(8, 3)
    g = distributed.put_global(x, rows)
    assert g.sharding == rows and len(g.addressable_shards) == 8
    np.testing.assert_array_equal(distributed.to_host(g * 2), x * 2)
    np.testing.assert_array_equal(distributed.to_host(distributed.put_process_rows(x, rows, 8)), x)
    assert distributed.process_rows(rows, 8) == (0, 8)
    assert distributed.broadcast_json({"a": [1, 2]}) == {"a": [1, 2]}
    np.testing.assert_array_equal(distributed.process_gather([3, 4]), [[3, 4]])
    distributed.check_same({"seed": 0}, "settings")
    distributed.barrier("nothing to wait for")
