"""native_sgd.c's update loop written for numba, compiled into a C callback (``numba.cfunc``).

numba ships its own LLVM, so this path needs no system compiler. The callback has the C
function's signature (``clrun_sgd_update``), so native.py's :class:`NativeSGD` calls either one
the same way. Each line is native_sgd.c's: ``fmaf`` below emits LLVM's ``llvm.fma.f32`` exactly
where the C file calls ``fmaf`` (ATen's vectorised addcmul / add-with-alpha are fused
multiply-adds), and numba contracts nothing else (no fastmath), so the numbers are the C
kernel's. Importing this module needs numba; :func:`compiled` compiles once per process (numba
caches the machine code on disk where it can, keyed by the CPU).
"""

from __future__ import annotations

import functools

from llvmlite import ir
from numba import carray, cfunc, types
from numba.extending import intrinsic

HAS_QUAD, HAS_WD, HAS_MOMENTUM, NESTEROV = 1, 2, 4, 8


@intrinsic
def fmaf(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma.f32), as C's fmaf."""
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = builder.module.declare_intrinsic("llvm.fma", [f32], ir.FunctionType(f32, [f32, f32, f32]))
        return builder.call(fn, args)

    return sig, codegen


_F32P = types.CPointer(types.float32)
_PTRS = types.CPointer(_F32P)
SIGNATURE = types.int32(types.int64, _PTRS, _PTRS, _PTRS, _PTRS, _PTRS, types.CPointer(types.int64),
                        types.int32, types.float32, types.float32, types.float32, types.float32,
                        types.float32, types.float32)


def _update(count, params, grads, omega, omega_anchor, bufs, sizes, flags, c, neg_c, wd, m,
            one_minus_dampening, neg_lr):
    if flags & ~(HAS_QUAD | HAS_WD | HAS_MOMENTUM | NESTEROV) or (flags & NESTEROV and not flags & HAS_MOMENTUM):
        return -1
    for t in range(count):
        n = sizes[t]
        p = carray(params[t], (n,))
        g = carray(grads[t], (n,))
        o = carray(omega[t], (n,)) if flags & HAS_QUAD else p
        oa = carray(omega_anchor[t], (n,)) if flags & HAS_QUAD else p
        b = carray(bufs[t], (n,)) if flags & HAS_MOMENTUM else p
        for i in range(n):
            gi = g[i]
            if flags & HAS_QUAD:
                gi = fmaf(c * o[i], p[i], gi)
                gi = fmaf(oa[i], neg_c, gi)
                g[i] = gi
            d = gi
            if flags & HAS_WD:
                d = fmaf(p[i], wd, d)
            if flags & HAS_MOMENTUM:
                bi = b[i] * m
                bi = fmaf(d, one_minus_dampening, bi)
                b[i] = bi
                if flags & NESTEROV:
                    d = fmaf(bi, m, d)
                    if not flags & HAS_WD:
                        g[i] = d  # torch updates p.grad in place unless weight decay copied it
                else:
                    d = bi
            p[i] = fmaf(d, neg_lr, p[i])
    return 0


@functools.lru_cache(maxsize=1)
def compiled():
    """The compiled callback (``.address`` is its C function pointer)."""
    return cfunc(SIGNATURE, nopython=True, error_model="numpy", cache=True)(_update)
