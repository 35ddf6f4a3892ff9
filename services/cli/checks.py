"""Start-up checks that fail at once, in one line naming the setting, before any model loads: cheap (no torch
where every device is the CPU), so the serving commands run them before they start anything."""

from __future__ import annotations

from services.contracts.errors import ConfigurationError
from services.contracts.settings import Settings


def check_port(host: str, port: int, variable: str = "NEXTGPT_PORT") -> None:
    """Fail at once when the address is taken, not after minutes of loading models."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ConfigurationError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another port with "
                                     f"--port or {variable}", code="port_unavailable") from exc


def check_devices(settings: Settings, groups: tuple[str, ...] = ("encoder", "llm", "decoders")) -> None:
    """Refuse, in one line naming the variable, a device this machine does not have (before any model loads)."""
    devices = {group: str(getattr(settings, group).device) for group in groups}
    if all(device == "cpu" for device in devices.values()):
        return  # every machine has one; torch (seconds to import) is not needed to say so
    import torch

    for group, device in devices.items():
        kind = device.split(":")[0]
        index = int(device.split(":")[1]) if ":" in device and device.split(":")[1].isdigit() else 0
        if kind == "cuda" and (not torch.cuda.is_available() or index >= torch.cuda.device_count()):
            raise ConfigurationError(f"NEXTGPT_{group.upper()}__DEVICE={device}: this machine has "
                                     f"{torch.cuda.device_count()} CUDA device(s)", code="invalid_settings")
        if kind not in ("cpu", "cuda", "mps") or (kind == "mps" and not torch.backends.mps.is_available()):
            raise ConfigurationError(f"NEXTGPT_{group.upper()}__DEVICE={device}: not a device of this machine "
                                     "(cpu, cuda, cuda:N)", code="invalid_settings")
