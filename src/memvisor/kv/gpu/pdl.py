"""Programmatic dependent launch (PDL): whether the decode kernels launch with it (host side, no Triton import).

On Hopper (sm_90) and newer a kernel launched with CUDA's programmatic stream serialization attribute may start
while the kernel before it in the stream still runs, once every program of that kernel has executed
``griddepcontrol.launch_dependents`` (or exited); the new kernel's ``griddepcontrol.wait`` then blocks until the
earlier kernel has finished and its writes are visible. The swap decode kernel (gluon_kivi_swap.py) copies its
first unit of quantized codes and scales before that wait, so the fixed start-up cost of each layer's launch
overlaps the launch before it; its combine launch waits before it reads the partials. A CUDA graph captured
from such launches keeps them as programmatic edges.

Elsewhere (a card before sm_90, a Triton whose CUDA backend has no ``launch_pdl`` option, Triton's CPU
interpreter) the kernels are built without the ``griddepcontrol`` instructions and launched plainly.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable

import torch


def pdl_supported(capability: tuple[int, int], launch_options: Iterable[str], interpreting: bool = False) -> bool:
    """Whether a card of compute ``capability`` can run the kernels with PDL, given the names of the Triton CUDA
    backend's compile/launch options (``launch_pdl`` is among them from Triton 3.4 on)."""
    return not interpreting and tuple(capability) >= (9, 0) and "launch_pdl" in set(launch_options)


def triton_launch_options() -> frozenset[str]:
    """Names of the options a Triton kernel launch takes on CUDA (empty without Triton's CUDA backend)."""
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return frozenset()
    return frozenset(f.name for f in dataclasses.fields(CUDAOptions))


@functools.lru_cache(maxsize=None)
def pdl_available(device: torch.device) -> bool:
    """:func:`pdl_supported` for a CUDA device (cached per device)."""
    if not torch.cuda.is_available() or device.type != "cuda":
        return False
    return pdl_supported(torch.cuda.get_device_capability(device), triton_launch_options(),
                         os.environ.get("TRITON_INTERPRET") == "1")


def resolve_pdl(pdl: bool | None, device: torch.device) -> bool:
    """A launch's PDL setting: None = wherever available; True where unavailable raises (no silent fallback for
    an explicit request)."""
    if pdl is None:
        return pdl_available(device)
    if pdl and not pdl_available(device):
        raise RuntimeError("programmatic dependent launch needs sm_90+ and a Triton with the launch_pdl option")
    return bool(pdl)
