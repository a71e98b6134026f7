"""Enumerates the CUDA devices (through torch) and the CPU, with total and free memory."""

from __future__ import annotations

import platform

import psutil
import torch

from cortex.protocol.messages import DeviceInfo

_MB = 2**20


class DeviceError(ValueError):
    pass


def discover(selection: list[str] | None = None) -> list[DeviceInfo]:
    """All devices, or those named in `selection` (`cpu`, `cuda:0`, ...). GPUs first."""
    devices = [_cuda(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    devices.append(_cpu())
    if selection:
        known = {d.id: d for d in devices}
        missing = [s for s in selection if s not in known]
        if missing:
            raise DeviceError(f"devices {missing} not found on this machine; it has {sorted(known)}")
        devices = [known[s] for s in selection]
    return devices


def refresh(device: DeviceInfo) -> DeviceInfo:
    """The same device with its free memory read again."""
    fresh = _cuda(int(device.id.split(":")[1])) if device.kind == "cuda" else _cpu()
    return device.model_copy(update={"free_mb": fresh.free_mb, "total_mb": fresh.total_mb})


def budgeted(device: DeviceInfo, used_mb: int, limit_mb: int | None, reserve_mb: int) -> DeviceInfo:
    """The device as placement sees it: a declared budget (or the total less a reserve), less what
    the models here take, and never more than the device really has free."""
    total = limit_mb if limit_mb is not None else max(0, device.total_mb - reserve_mb)
    free = max(0, min(total - used_mb, device.free_mb - reserve_mb))
    return device.model_copy(update={"total_mb": total, "free_mb": free})


def _cuda(index: int) -> DeviceInfo:
    free, total = torch.cuda.mem_get_info(index)
    return DeviceInfo(
        id=f"cuda:{index}",
        kind="cuda",
        name=torch.cuda.get_device_name(index),
        total_mb=total // _MB,
        free_mb=free // _MB,
    )


def _cpu() -> DeviceInfo:
    mem = psutil.virtual_memory()
    name = platform.processor() or platform.machine() or "cpu"
    return DeviceInfo(id="cpu", kind="cpu", name=name, total_mb=mem.total // _MB, free_mb=mem.available // _MB)
