"""cluster.yaml passes Ray's own cluster-launcher validation and has the shape the job needs."""

from __future__ import annotations

import copy
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def test_ray_validates_the_cluster_config(config):
    validate_config(prepare_config(copy.deepcopy(config)))


def test_gpu_workers_autoscale_from_zero_and_setup_installs_the_project(config):
    workers = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1]
    assert workers and all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in workers)
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    assert any("pip install" in command and "turkish-captioner" in command for command in config["setup_commands"])


@pytest.mark.parametrize("break_it", [
    lambda c: c.pop("head_node_type"),
    lambda c: c["available_node_types"]["gpu_worker"].update(min_workers="zero"),
    lambda c: c.update(unknown_top_level_field=1),
])
def test_validation_rejects_broken_configs(config, break_it):
    broken = copy.deepcopy(config)
    break_it(broken)
    with pytest.raises((ValueError, KeyError, jsonschema.ValidationError)):
        validate_config(prepare_config(broken))
