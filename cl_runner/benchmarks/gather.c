/* Pixel gathers for streams whose tasks remap a dataset's pixels (rotations, permutations).
 *
 * out[i, c, j] = src[rows[i], c, index[j]] over the flattened H*W pixels of each channel, and 0
 * where index[j] < 0 (a pixel that comes from outside the image). rows == NULL means row i.
 * Rows start..stop-1 of out are written, so callers split the rows between threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int clrun_gather_pixels(const uint8_t *src, int64_t src_stride, const int64_t *rows,
                        int64_t start, int64_t stop, int64_t channels, int64_t hw,
                        const int32_t *index, uint8_t *out)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    int64_t groups = hw / 8;  /* packed stores below assume little-endian byte order */
#else
    int64_t groups = 0;
#endif
    int32_t *clamped = malloc(sizeof(int32_t) * (size_t)(hw > 0 ? hw : 1));
    uint64_t *keep = malloc(sizeof(uint64_t) * (size_t)(groups > 0 ? groups : 1));
    if (!clamped || !keep) {
        free(clamped);
        free(keep);
        return -1;
    }
    /* Out-of-image pixels read pixel 0 and are masked to 0: no branch in the inner loop. */
    for (int64_t j = 0; j < hw; ++j)
        clamped[j] = index[j] < 0 ? 0 : index[j];
    for (int64_t g = 0; g < groups; ++g) {
        uint64_t m = 0;
        for (int b = 0; b < 8; ++b)
            if (index[g * 8 + b] >= 0)
                m |= (uint64_t)0xff << (8 * b);
        keep[g] = m;
    }
    for (int64_t i = start; i < stop; ++i) {
        const uint8_t *s = src + (rows ? rows[i] : i) * src_stride;
        uint8_t *o = out + i * channels * hw;
        for (int64_t c = 0; c < channels; ++c, s += hw, o += hw) {
            /* Eight pixels packed into one 64-bit store. */
            for (int64_t g = 0; g < groups; ++g) {
                const int32_t *k = clamped + 8 * g;
                uint64_t v = (uint64_t)s[k[0]] | (uint64_t)s[k[1]] << 8
                           | (uint64_t)s[k[2]] << 16 | (uint64_t)s[k[3]] << 24
                           | (uint64_t)s[k[4]] << 32 | (uint64_t)s[k[5]] << 40
                           | (uint64_t)s[k[6]] << 48 | (uint64_t)s[k[7]] << 56;
                v &= keep[g];
                memcpy(o + 8 * g, &v, 8);
            }
            for (int64_t j = 8 * groups; j < hw; ++j)
                o[j] = index[j] < 0 ? 0 : s[index[j]];
        }
    }
    free(clamped);
    free(keep);
    return 0;
}
