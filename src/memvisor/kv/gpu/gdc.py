"""Grid dependency control (the device side of programmatic dependent launch, pdl.py) for Triton and Gluon
kernels: ``griddepcontrol.wait`` / ``griddepcontrol.launch_dependents`` as inline PTX (sm_90+; the kernels emit
them only under a ``PDL`` constexpr, so older cards never see them). The same instructions as Triton's
``tl.extra.cuda.gdc_wait`` / ``gdc_launch_dependents``, written here so that Gluon kernels can use them too.

Both are no-ops in a kernel launched without the PDL attribute."""

from __future__ import annotations

import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

_WAIT = tl.constexpr("griddepcontrol.wait; // $0")
_LAUNCH = tl.constexpr("griddepcontrol.launch_dependents; // $0")


@triton.jit
def tl_gdc_wait():
    """Block until the kernels this one depends on have finished and their writes are visible."""
    tl.inline_asm_elementwise(_WAIT, "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def tl_gdc_launch_dependents():
    """Let the next kernel in the stream start (once every program of this one has said so or exited)."""
    tl.inline_asm_elementwise(_LAUNCH, "=r", [], dtype=tl.int32, is_pure=False, pack=1)


@gluon.jit
def gl_gdc_wait():
    """:func:`tl_gdc_wait` in a Gluon kernel."""
    gl.inline_asm_elementwise(_WAIT, "=r", [], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def gl_gdc_launch_dependents():
    """:func:`tl_gdc_launch_dependents` in a Gluon kernel."""
    gl.inline_asm_elementwise(_LAUNCH, "=r", [], dtype=gl.int32, is_pure=False, pack=1)
