/* One pass over the parameters for an SGD step on the CPU (see native.py).

   For each element, in this order and in float32:
     g = g + c * Omega * theta - c * OmegaTheta*     quadratic penalty's gradient (HAS_QUAD)
     d = g + wd * theta                              weight decay (HAS_WD)
     b = momentum * b + (1 - dampening) * d          (HAS_MOMENTUM)
     d = d + momentum * b   (NESTEROV)   or   d = b
     theta = theta - lr * d
   Each line is the operation PyTorch's CPU kernels perform for the same step
   (ImportanceRegularizer.after_backward's addcmul_ and add_, then torch.optim.SGD's foreach
   update): where ATen's vectorised kernels use a fused multiply-add (addcmul, add with alpha),
   so does this file, and nothing else is contracted (the file is compiled with
   -ffp-contract=off). The gradient tensor is left as those kernels leave p.grad. */

#include <math.h>
#include <stdint.h>

#define HAS_QUAD 1
#define HAS_WD 2
#define HAS_MOMENTUM 4
#define NESTEROV 8

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define CLRUN_X86 1
#define CLRUN_TARGET __attribute__((target("avx2,fma")))
#else
#define CLRUN_TARGET
#endif

/* 1 where this CPU has hardware fused multiply-add (without it fmaf is a slow library call and
   the caller keeps PyTorch's kernels). */
int clrun_native_usable(void) {
#if defined(CLRUN_X86)
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#elif defined(__aarch64__)
    return 1;
#else
    return 0;
#endif
}

static inline __attribute__((always_inline)) CLRUN_TARGET void
update(const int flags, int64_t n, float *restrict p, float *restrict g, const float *restrict o,
       const float *restrict oa, float *restrict b, float c, float neg_c, float wd, float m,
       float one_minus_dampening, float neg_lr) {
    for (int64_t i = 0; i < n; i++) {
        float gi = g[i];
        if (flags & HAS_QUAD) {
            gi = fmaf(c * o[i], p[i], gi);
            gi = fmaf(oa[i], neg_c, gi);
            g[i] = gi;
        }
        float d = gi;
        if (flags & HAS_WD)
            d = fmaf(p[i], wd, d);
        if (flags & HAS_MOMENTUM) {
            float bi = b[i] * m;
            bi = fmaf(d, one_minus_dampening, bi);
            b[i] = bi;
            if (flags & NESTEROV) {
                d = fmaf(bi, m, d);
                if (!(flags & HAS_WD))
                    g[i] = d; /* torch updates p.grad in place unless weight decay copied it */
            } else {
                d = bi;
            }
        }
        p[i] = fmaf(d, neg_lr, p[i]);
    }
}

#define CASE(F)                                                                                  \
    case F:                                                                                      \
        for (int64_t t = 0; t < count; t++)                                                      \
            update(F, sizes[t], params[t], grads[t], omega ? omega[t] : 0,                       \
                   omega_anchor ? omega_anchor[t] : 0, bufs ? bufs[t] : 0, c, neg_c, wd, m,      \
                   one_minus_dampening, neg_lr);                                                 \
        return 0;

/* Returns 0, or -1 for a flag combination it does not know. */
CLRUN_TARGET int clrun_sgd_update(int64_t count, float *const *params, float *const *grads,
                                  const float *const *omega, const float *const *omega_anchor,
                                  float *const *bufs, const int64_t *sizes, int flags, float c,
                                  float neg_c, float wd, float m, float one_minus_dampening,
                                  float neg_lr) {
    switch (flags) {
        CASE(0)
        CASE(1)
        CASE(2)
        CASE(3)
        CASE(4)
        CASE(5)
        CASE(6)
        CASE(7)
        CASE(12)
        CASE(13)
        CASE(14)
        CASE(15)
    default:
        return -1;
    }
}
