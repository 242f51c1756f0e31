"""Razor in Ray workers: the path of ``--distributed-executor-backend ray`` (deploy/k8s/multi-node).

vLLM 0.32's CPU platform has no Ray device key, so its Ray executor refuses to start on CPU
("current platform cpu does not support ray", ``ray_utils.initialize_ray_cluster``); a whole Ray
engine runs only on GPUs. What razor adds to that path is checked here with the real pieces, on a
Ray head this test starts on 127.0.0.1 and shuts down: the engine's ``VllmConfig`` (RAZOR enum
member, razor options) crosses Ray's serialisation into a worker actor built from vLLM's own
``RayWorkerWrapper``, whose ``init_worker`` loads the general plugins and builds the CPU worker as
the Ray executor does; in that worker razor resolves the options and plans the same pools as the
driver.
"""

from __future__ import annotations

import os
import sys

import pytest

ray = pytest.importorskip("ray")

pytestmark = pytest.mark.engine  # a Ray cluster and vLLM workers: slow


def _in_worker(worker) -> dict:
    """Runs inside the Ray actor, on vLLM's worker object (``run_method`` with a pickled function)."""
    import razor_vllm.vllm_compat as compat
    from razor_vllm.balance import plan_for_resolved
    from razor_vllm.config import ModelFingerprint
    from razor_vllm.options import resolve_for_vllm_config

    config = worker.vllm_config
    resolved = resolve_for_vllm_config(config)
    served = ModelFingerprint.from_hf_config(config.model_config.hf_config)
    plan = plan_for_resolved(resolved, served.num_kv_heads, config.parallel_config.tensor_parallel_size)
    return dict(
        pid=os.getpid(),
        plugin_installed=compat._INSTALLED,
        backend=config.attention_config.backend.name,
        is_razor=compat.is_razor_config(config),
        worker=type(worker.worker).__name__,
        options=config.additional_config["razor"],
        heads=[r.heads for r in plan.ranks],
    )


@pytest.fixture
def ray_head():
    ray.init(
        _node_ip_address="127.0.0.1",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": os.environ.get("PYTHONPATH", "")}},
    )
    try:
        yield
    finally:
        ray.shutdown()


def test_razor_config_crosses_ray_into_vllms_worker_wrapper(ray_head, tmp_path):
    import cloudpickle
    from vllm.v1.executor.ray_utils import RayWorkerWrapper

    from razor_vllm.balance import plan_for_resolved
    from razor_vllm.options import resolve_for_vllm_config

    from tiny_models import unbalanced_tp2_config

    config = unbalanced_tp2_config(tmp_path / "tiny", window=24, tp_balance="promote")
    options = {"profile": str(tmp_path / "tiny" / "p.yaml"), "window": 24, "tp_balance": "promote"}
    expected = [r.heads for r in plan_for_resolved(resolve_for_vllm_config(config), 2, 2).ranks]

    # As RayDistributedExecutor._init_workers_ray: an actor of vLLM's wrapper, then init_worker.
    actor = ray.remote(num_cpus=0)(RayWorkerWrapper).remote(rpc_rank=0)
    kwargs = dict(
        vllm_config=config, local_rank=0, rank=0, distributed_init_method="tcp://127.0.0.1:0", is_driver_worker=True
    )
    ray.get(actor.execute_method.remote("init_worker", [kwargs]), timeout=600)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the worker cannot import this test module
    seen = ray.get(actor.execute_method.remote(cloudpickle.dumps(_in_worker)), timeout=600)

    assert seen["pid"] != os.getpid()  # a Ray worker process, not this one
    assert seen["plugin_installed"] and seen["backend"] == "RAZOR" and seen["is_razor"]
    assert seen["worker"] == "CPUWorker"
    assert seen["options"] == options
    assert seen["heads"] == expected  # the worker plans what the driver plans: one layout for all ranks
