"""Which of this node's devices a model goes on, and whether it fits there now."""

from __future__ import annotations

from cortex.protocol.messages import DeviceInfo, ModelSpec
from neuron.engine.worker import DeviceWorker
from neuron.models import LoadError
from neuron.sources.inspect import refuse
from neuron.sources.preflight import Plan


def choose_devices(
    workers: dict[str, DeviceWorker], views: dict[str, DeviceInfo], spec: ModelSpec, device: str | None
) -> list[DeviceWorker]:
    """The named device, else the `spec.devices` freest GPUs, else the CPU."""
    if device is not None:
        if device not in workers:
            raise LoadError(f"device {device} is not served by this neuron; it has {sorted(workers)}")
        return [workers[device]]
    gpus = [w for w in workers.values() if w.device.kind == "cuda"]
    if gpus:
        gpus.sort(key=lambda w: views[w.device.id].free_mb, reverse=True)
        return gpus[: spec.devices]
    return [next(iter(workers.values()))]


def check_fit(plan: Plan, views: list[DeviceInfo]) -> None:
    need = plan.memory_mb
    free = sum(v.free_mb for v in views)
    if need <= free:
        return
    where = ", ".join(f"{v.id} has {v.free_mb} MB free of {v.total_mb} MB" for v in views)
    parts = f"weights {plan.weights_mb} MB + KV cache {plan.kv_mb} MB" if not plan.spec.memory_mb else "memory_mb"
    raise refuse(
        "insufficient_memory",
        plan.spec,
        f"needs {need} MB ({parts}); {where}",
        "unload a model on this node, lower `context` in models.toml, or load it on a node with more memory",
    )
