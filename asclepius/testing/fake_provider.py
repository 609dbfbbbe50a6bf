"""Ray's `fake_multinode` node provider (worker nodes as processes on this machine), with the one thing that sets real
nodes apart that a job notices: each node unpacks the job's working_dir into a folder of its own.

Ray's fake nodes share the head's session directory, so a worker node that unpacks the job's `--working-dir` package
replaces the folder the driver runs in, and the driver's next import fails (`FileNotFoundError` from getcwd). On a
real cluster every node has its own disk. Used as `provider: {type: external, module: ...SeparateDisksProvider}`."""

from __future__ import annotations

import ray._private.parameter as parameter
from ray.autoscaler._private.fake_multi_node.node_provider import FakeMultiNodeProvider


class SeparateDisksProvider(FakeMultiNodeProvider):
    def _create_node_with_resources_and_labels(self, node_config, tags, count, resources, labels):
        with self.lock:  # re-entrant: the base class takes it again
            own_folder = f"runtime_resources_node{self._next_node_id + 1:05d}"
            original = parameter.RayParams

            def params_with_own_folder(*args, **kwargs):
                kwargs.setdefault("runtime_env_dir_name", own_folder)
                return original(*args, **kwargs)

            parameter.RayParams = params_with_own_folder
            try:
                return super()._create_node_with_resources_and_labels(node_config, tags, count, resources, labels)
            finally:
                parameter.RayParams = original
