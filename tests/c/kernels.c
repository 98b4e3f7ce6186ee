/* Runs kernels of the C ABI on buffers this program owns (linked against the static library): RMSNorm, the fused
 * add + RMSNorm, SwiGLU, argmax, embedding gather, seeded sampling, the MoE router, a whole MoE layer, the
 * dequantisation of every weight format, RoPE, the MLA cache writer and attention over a paged cache, and the vision
 * tower's kernels, on the PTX interpreter and, when there is one, on GPU 0 (where the addresses are what cudaMalloc
 * returns), each checked against a plain C computation, plus the errors of bad calls. Prints one "ok NAME" line per
 * check and exits 0 when all pass. */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "small4.h"

static Small4Device *device;

static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7fff + ((u >> 16) & 1); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static float from_bf16(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define CHECK(call)                                                                                       \
    do {                                                                                                  \
        Small4Status status_ = (call);                                                                    \
        if (status_ != SMALL4_STATUS_OK) {                                                                \
            fprintf(stderr, "%s:%d: %s failed with status %d: %s\n", __FILE__, __LINE__, #call, (int)status_, \
                    small4_last_error());                                                                 \
            exit(1);                                                                                      \
        }                                                                                                 \
    } while (0)

/* Device memory holding a copy of `bytes` bytes of `data` (uninitialised when data is NULL). */
static uint64_t upload(const void *data, size_t bytes) {
    uint64_t addr = 0;
    CHECK(small4_device_alloc(device, bytes, &addr));
    if (data) CHECK(small4_device_write(device, addr, data, bytes));
    return addr;
}

/* Releases device buffers from `upload`. */
static void release_all(const uint64_t *addrs, size_t count) {
    for (size_t i = 0; i < count; i++) CHECK(small4_device_release(device, addrs[i]));
}
#define RELEASE_ALL(...) release_all((const uint64_t[]){__VA_ARGS__}, sizeof((const uint64_t[]){__VA_ARGS__}) / sizeof(uint64_t))

static void expect_close(const char *what, const float *got, const float *want, size_t n, float tolerance) {
    for (size_t i = 0; i < n; i++) {
        if (!(fabsf(got[i] - want[i]) <= tolerance * (1.0f + fabsf(want[i])))) {
            fprintf(stderr, "%s[%zu] = %g, want %g\n", what, i, got[i], want[i]);
            exit(1);
        }
    }
    printf("ok %s\n", what);
}

/* Exits unless a bad call returned `want`, the status of its typed error. */
static void expect_status(const char *what, Small4Status got, Small4Status want) {
    if (got != want) {
        fprintf(stderr, "%s: status %d, want %d: %s\n", what, (int)got, (int)want, small4_last_error());
        exit(1);
    }
}

static void rms_norms(void) {
    enum { ROWS = 3, COLS = 256 };
    static uint16_t x[ROWS * COLS], residual[ROWS * COLS], weight[COLS], out[ROWS * COLS], sum[ROWS * COLS];
    static float got[ROWS * COLS], want[ROWS * COLS], got_sum[ROWS * COLS], want_sum[ROWS * COLS];
    const float eps = 1e-6f;
    for (int i = 0; i < ROWS * COLS; i++) {
        x[i] = to_bf16((float)((i * 37) % 101 - 50) / 25.0f);
        residual[i] = to_bf16((float)((i * 11) % 23 - 11) / 8.0f);
    }
    for (int c = 0; c < COLS; c++) weight[c] = to_bf16(0.5f + (float)(c % 7) / 8.0f);
    uint64_t x_dev = upload(x, sizeof x), residual_dev = upload(residual, sizeof residual);
    uint64_t weight_dev = upload(weight, sizeof weight), out_dev = upload(NULL, sizeof out), sum_dev = upload(NULL, sizeof sum);

    CHECK(small4_rms_norm(device, x_dev, weight_dev, out_dev, ROWS, COLS, eps));
    CHECK(small4_device_read(device, out, out_dev, sizeof out));
    for (int r = 0; r < ROWS; r++) {
        double mean_sq = 0;
        for (int c = 0; c < COLS; c++) mean_sq += (double)from_bf16(x[r * COLS + c]) * from_bf16(x[r * COLS + c]);
        double inv_rms = 1.0 / sqrt(mean_sq / COLS + eps);
        for (int c = 0; c < COLS; c++) {
            want[r * COLS + c] = (float)(from_bf16(x[r * COLS + c]) * inv_rms) * from_bf16(weight[c]);
            got[r * COLS + c] = from_bf16(out[r * COLS + c]);
        }
    }
    expect_close("rms_norm", got, want, ROWS * COLS, 1.0f / 128.0f);

    CHECK(small4_add_rms_norm(device, x_dev, residual_dev, weight_dev, sum_dev, out_dev, ROWS, COLS, eps));
    CHECK(small4_device_read(device, sum, sum_dev, sizeof sum));
    CHECK(small4_device_read(device, out, out_dev, sizeof out));
    for (int r = 0; r < ROWS; r++) {
        double mean_sq = 0;
        for (int c = 0; c < COLS; c++) {
            float h = from_bf16(to_bf16(from_bf16(x[r * COLS + c]) + from_bf16(residual[r * COLS + c])));
            want_sum[r * COLS + c] = h;
            got_sum[r * COLS + c] = from_bf16(sum[r * COLS + c]);
            mean_sq += (double)h * h;
        }
        double inv_rms = 1.0 / sqrt(mean_sq / COLS + eps);
        for (int c = 0; c < COLS; c++) {
            want[r * COLS + c] = (float)(want_sum[r * COLS + c] * inv_rms) * from_bf16(weight[c]);
            got[r * COLS + c] = from_bf16(out[r * COLS + c]);
        }
    }
    expect_close("add_rms_norm residual", got_sum, want_sum, ROWS * COLS, 0.0f);
    expect_close("add_rms_norm", got, want, ROWS * COLS, 1.0f / 128.0f);

    /* Bad calls: a typed status and a message, the buffers untouched. */
    expect_status("rms_norm with eps NaN", small4_rms_norm(device, x_dev, weight_dev, out_dev, ROWS, COLS, NAN), SMALL4_STATUS_INVALID_ARGUMENT);
    if (strstr(small4_last_error(), "eps") == NULL) {
        fprintf(stderr, "rms_norm with eps NaN: the message does not name eps: %s\n", small4_last_error());
        exit(1);
    }
    expect_status("rms_norm without a device", small4_rms_norm(NULL, x_dev, weight_dev, out_dev, ROWS, COLS, eps), SMALL4_STATUS_INVALID_ARGUMENT);
    expect_status("rms_norm of a null address", small4_rms_norm(device, 0, weight_dev, out_dev, ROWS, COLS, eps), SMALL4_STATUS_INVALID_ARGUMENT);
    printf("ok rms_norm errors\n");
    RELEASE_ALL(x_dev, residual_dev, weight_dev, out_dev, sum_dev);
}

static void silu_mul_and_argmax(void) {
    enum { TOKENS = 4, HIDDEN = 64, VOCAB = 1000 };
    static uint16_t gate_up[TOKENS * 2 * HIDDEN], out[TOKENS * HIDDEN];
    static float got[TOKENS * HIDDEN], want[TOKENS * HIDDEN], logits[TOKENS * VOCAB];
    for (int i = 0; i < TOKENS * 2 * HIDDEN; i++) gate_up[i] = to_bf16((float)((i * 29) % 61 - 30) / 10.0f);
    uint64_t gate_up_dev = upload(gate_up, sizeof gate_up), out_dev = upload(NULL, sizeof out);
    CHECK(small4_silu_mul(device, gate_up_dev, out_dev, TOKENS, HIDDEN));
    CHECK(small4_device_read(device, out, out_dev, sizeof out));
    for (int t = 0; t < TOKENS; t++) {
        for (int h = 0; h < HIDDEN; h++) {
            float g = from_bf16(gate_up[t * 2 * HIDDEN + h]), u = from_bf16(gate_up[t * 2 * HIDDEN + HIDDEN + h]);
            want[t * HIDDEN + h] = g / (1.0f + expf(-g)) * u;
            got[t * HIDDEN + h] = from_bf16(out[t * HIDDEN + h]);
        }
    }
    expect_close("silu_mul", got, want, TOKENS * HIDDEN, 1.0f / 64.0f);

    int32_t want_ids[TOKENS], got_ids[TOKENS];
    for (int t = 0; t < TOKENS; t++) {
        for (int v = 0; v < VOCAB; v++) logits[t * VOCAB + v] = sinf((float)(v * (t + 3)));
        want_ids[t] = 0;
        for (int v = 1; v < VOCAB; v++)
            if (logits[t * VOCAB + v] > logits[t * VOCAB + want_ids[t]]) want_ids[t] = v;
    }
    uint64_t logits_dev = upload(logits, sizeof logits), ids_dev = upload(NULL, sizeof got_ids);
    CHECK(small4_argmax(device, logits_dev, TOKENS, VOCAB, ids_dev));
    CHECK(small4_device_read(device, got_ids, ids_dev, sizeof got_ids));
    if (memcmp(got_ids, want_ids, sizeof got_ids) != 0) {
        fprintf(stderr, "argmax: got %d %d %d %d, want %d %d %d %d\n", got_ids[0], got_ids[1], got_ids[2], got_ids[3],
                want_ids[0], want_ids[1], want_ids[2], want_ids[3]);
        exit(1);
    }
    printf("ok argmax\n");
    RELEASE_ALL(gate_up_dev, out_dev, logits_dev, ids_dev);
}

static void router(void) {
    enum { TOKENS = 3, DIM = 256, EXPERTS = 16, K = 4 };
    const float routed_scale = 2.5f;
    static uint16_t hidden[TOKENS * DIM], gate[EXPERTS * DIM];
    float logits[TOKENS * EXPERTS], want_weights[TOKENS * K], got_weights[TOKENS * K];
    int32_t want_ids[TOKENS * K], got_ids[TOKENS * K];
    /* Every expert's gate row is constant, a distinct value (7e mod 16 permutes the experts); odd tokens flip the
     * order: the top k are far from any tie. */
    for (int t = 0; t < TOKENS; t++)
        for (int d = 0; d < DIM; d++) hidden[t * DIM + d] = to_bf16((t % 2 ? -1.0f : 1.0f) * (1.0f + (float)t / 8.0f) / 16.0f);
    for (int e = 0; e < EXPERTS; e++)
        for (int d = 0; d < DIM; d++) gate[e * DIM + d] = to_bf16((float)((e * 7) % 16 - 8) / 64.0f);
    for (int t = 0; t < TOKENS; t++) {
        float max = -INFINITY, total = 0, probs[EXPERTS];
        for (int e = 0; e < EXPERTS; e++) {
            float dot = 0;
            for (int d = 0; d < DIM; d++) dot += from_bf16(hidden[t * DIM + d]) * from_bf16(gate[e * DIM + d]);
            logits[t * EXPERTS + e] = dot;
            if (dot > max) max = dot;
        }
        for (int e = 0; e < EXPERTS; e++) total += probs[e] = expf(logits[t * EXPERTS + e] - max);
        float chosen = 0;
        for (int j = 0; j < K; j++) {
            int best = -1;
            for (int e = 0; e < EXPERTS; e++) {
                int taken = 0;
                for (int i = 0; i < j; i++) taken |= want_ids[t * K + i] == e;
                if (!taken && (best < 0 || probs[e] > probs[best])) best = e;
            }
            want_ids[t * K + j] = best;
            chosen += probs[best] / total;
        }
        for (int j = 0; j < K; j++) want_weights[t * K + j] = probs[want_ids[t * K + j]] / total / chosen * routed_scale;
    }
    uint64_t hidden_dev = upload(hidden, sizeof hidden), gate_dev = upload(gate, sizeof gate);
    uint64_t ids_dev = upload(NULL, sizeof got_ids), weights_dev = upload(NULL, sizeof got_weights);
    CHECK(small4_router_topk(device, hidden_dev, gate_dev, TOKENS, DIM, EXPERTS, K, routed_scale, ids_dev, weights_dev));
    CHECK(small4_device_read(device, got_ids, ids_dev, sizeof got_ids));
    CHECK(small4_device_read(device, got_weights, weights_dev, sizeof got_weights));
    for (int i = 0; i < TOKENS * K; i++) {
        if (got_ids[i] != want_ids[i]) {
            fprintf(stderr, "router topk_ids[%d] = %d, want %d\n", i, got_ids[i], want_ids[i]);
            exit(1);
        }
    }
    printf("ok router topk_ids\n");
    expect_close("router topk_weights", got_weights, want_weights, TOKENS * K, 1e-4f);
    expect_status("router with k > experts", small4_router_topk(device, hidden_dev, gate_dev, TOKENS, DIM, EXPERTS, EXPERTS + 1, routed_scale, ids_dev, weights_dev), SMALL4_STATUS_INVALID_ARGUMENT);
    printf("ok router errors\n");
    RELEASE_ALL(hidden_dev, gate_dev, ids_dev, weights_dev);
}

/* A deterministic value in [-scale, scale) from an index (a small LCG hash). */
static float pattern(unsigned i, float scale) {
    unsigned h = i * 1103515245u + 12345u;
    return ((float)((h >> 8) % 2048) / 1024.0f - 1.0f) * scale;
}

/* y[rows] = w[rows, cols] @ x[cols]. */
static void matvec(const float *w, const float *x, int rows, int cols, float *y) {
    for (int r = 0; r < rows; r++) {
        float sum = 0;
        for (int c = 0; c < cols; c++) sum += w[r * cols + c] * x[c];
        y[r] = sum;
    }
}

/* v rounded to the nearest e4m3 value, ties to even, saturating at +-448 (what cvt.rn.satfinite.e4m3x2 does). */
static float round_e4m3(float v) {
    float a = fminf(fabsf(v), 448.0f);
    int e;
    frexpf(a, &e); /* a = m * 2^e, m in [0.5, 1): the leading bit is 2^(e - 1) */
    int exponent = e - 1 < -6 ? -6 : e - 1; /* below 2^-6 the subnormal spacing 2^-9 */
    float step = ldexpf(1.0f, exponent - 3); /* 3 mantissa bits */
    return copysignf(rintf(a / step) * step, v);
}

/* W8A8: `x` as the kernels see it after quantisation to e4m3 with the static `scale` (x * (1 / scale) rounded, times
 * scale); a scale of 0 leaves bf16 activations alone. */
static void quantise_act(float *x, int n, float scale) {
    if (scale == 0.0f) return;
    for (int i = 0; i < n; i++) x[i] = round_e4m3(x[i] * (1.0f / scale)) * scale;
}

/* One SwiGLU expert: w2 @ bf16(silu(w1 @ x) * (w3 @ x)), added to y with weight `scale`. With `act_scales` (W8A8),
 * the inputs of w1/w3 and of w2 are first quantised to e4m3 with act_scales[0] and act_scales[1]. */
static void expert(const float *w1, const float *w3, const float *w2, const float *x, int dim, int hidden, float scale, const float *act_scales, float *y) {
    float xq[256], gate[256], up[256], act[256], down[256];
    for (int d = 0; d < dim; d++) xq[d] = x[d];
    if (act_scales) quantise_act(xq, dim, act_scales[0]);
    matvec(w1, xq, hidden, dim, gate);
    matvec(w3, xq, hidden, dim, up);
    for (int h = 0; h < hidden; h++) act[h] = from_bf16(to_bf16(gate[h] / (1.0f + expf(-gate[h])) * up[h]));
    if (act_scales) quantise_act(act, hidden, act_scales[1]);
    matvec(w2, act, dim, hidden, down);
    for (int d = 0; d < dim; d++) y[d] += scale * down[d];
}

static void bf16_to_f32(const uint16_t *in, float *out, size_t n) {
    for (size_t i = 0; i < n; i++) out[i] = from_bf16(in[i]);
}

enum { MOE_TOKENS = 5, MOE_DIM = 128, MOE_HIDDEN = 128, MOE_EXPERTS = 4, MOE_K = 2, MOE_MATRIX = MOE_HIDDEN * MOE_DIM };

/* The routing of the MoE tests (token t: experts t and t + 1 with weights 0.625 and 0.375), its input rows, and the
 * layer's output by the plain C computation over float weights (the shared expert's first when given, always with
 * bf16 activations; the routed experts in W8A8 when `act_scales` is given). */
static void moe_reference(const uint16_t *x, const float *w1, const float *w3, const float *w2, const float *shared, const float *act_scales, int32_t *ids, float *weights, float *want) {
    float x_f[MOE_DIM];
    for (int t = 0; t < MOE_TOKENS; t++) {
        ids[t * MOE_K] = t % MOE_EXPERTS;
        ids[t * MOE_K + 1] = (t + 1) % MOE_EXPERTS;
        weights[t * MOE_K] = 0.625f;
        weights[t * MOE_K + 1] = 0.375f;
        bf16_to_f32(&x[t * MOE_DIM], x_f, MOE_DIM);
        float *y = &want[t * MOE_DIM];
        for (int d = 0; d < MOE_DIM; d++) y[d] = 0;
        if (shared) expert(shared, shared + MOE_MATRIX, shared + 2 * MOE_MATRIX, x_f, MOE_DIM, MOE_HIDDEN, 1.0f, NULL, y);
        for (int j = 0; j < MOE_K; j++) {
            size_t e = (size_t)ids[t * MOE_K + j];
            expert(&w1[e * MOE_MATRIX], &w3[e * MOE_MATRIX], &w2[e * MOE_MATRIX], x_f, MOE_DIM, MOE_HIDDEN, weights[t * MOE_K + j], act_scales, y);
        }
    }
}

/* Runs an opened layer on `x` with the routing of moe_reference and checks it against `want`. */
static void moe_forward_check(const char *what, Small4MoeLayer *layer, const uint16_t *x, const int32_t *ids, const float *weights, const float *want) {
    static uint16_t out[MOE_TOKENS * MOE_DIM];
    static float got[MOE_TOKENS * MOE_DIM];
    uint64_t x_dev = upload(x, MOE_TOKENS * MOE_DIM * sizeof(uint16_t)), ids_dev = upload(ids, MOE_TOKENS * MOE_K * sizeof(int32_t));
    uint64_t weights_dev = upload(weights, MOE_TOKENS * MOE_K * sizeof(float)), out_dev = upload(NULL, sizeof out);
    CHECK(small4_moe_layer_forward(device, layer, x_dev, MOE_TOKENS, ids_dev, weights_dev, MOE_K, out_dev));
    CHECK(small4_device_read(device, out, out_dev, sizeof out));
    bf16_to_f32(out, got, MOE_TOKENS * MOE_DIM);
    expect_close(what, got, want, MOE_TOKENS * MOE_DIM, 1e-2f);
    RELEASE_ALL(x_dev, ids_dev, weights_dev, out_dev);
}

static void moe_layer(void) {
    static uint16_t w1[MOE_EXPERTS * MOE_MATRIX], w3[MOE_EXPERTS * MOE_MATRIX], w2[MOE_EXPERTS * MOE_MATRIX], shared[3 * MOE_MATRIX];
    static uint16_t x[MOE_TOKENS * MOE_DIM];
    static float w1_f[MOE_EXPERTS * MOE_MATRIX], w3_f[MOE_EXPERTS * MOE_MATRIX], w2_f[MOE_EXPERTS * MOE_MATRIX], shared_f[3 * MOE_MATRIX];
    static float want[MOE_TOKENS * MOE_DIM];
    int32_t ids[MOE_TOKENS * MOE_K];
    float weights[MOE_TOKENS * MOE_K];
    for (unsigned i = 0; i < MOE_EXPERTS * MOE_MATRIX; i++) {
        w1[i] = to_bf16(pattern(i, 0.25f));
        w3[i] = to_bf16(pattern(i + 7919u * 1000u, 0.25f));
        w2[i] = to_bf16(pattern(i + 7919u * 2000u, 0.25f));
    }
    for (unsigned i = 0; i < 3 * MOE_MATRIX; i++) shared[i] = to_bf16(pattern(i + 7919u * 3000u, 0.25f));
    for (unsigned i = 0; i < MOE_TOKENS * MOE_DIM; i++) x[i] = to_bf16(pattern(i + 7919u * 6000u, 1.0f));
    bf16_to_f32(w1, w1_f, MOE_EXPERTS * MOE_MATRIX);
    bf16_to_f32(w3, w3_f, MOE_EXPERTS * MOE_MATRIX);
    bf16_to_f32(w2, w2_f, MOE_EXPERTS * MOE_MATRIX);
    bf16_to_f32(shared, shared_f, 3 * MOE_MATRIX);
    moe_reference(x, w1_f, w3_f, w2_f, shared_f, NULL, ids, weights, want);
    Small4MoeLayer *layer = NULL;
    CHECK(small4_moe_layer_open_bf16(device, MOE_EXPERTS, MOE_DIM, MOE_HIDDEN, w1, w3, w2, shared, shared + MOE_MATRIX, shared + 2 * MOE_MATRIX, &layer));
    moe_forward_check("moe_layer", layer, x, ids, weights, want);
    small4_moe_layer_free(layer);
    expect_status("a MoE layer with half a shared expert", small4_moe_layer_open_bf16(device, MOE_EXPERTS, MOE_DIM, MOE_HIDDEN, w1, w3, w2, shared, NULL, shared + 2 * MOE_MATRIX, &layer), SMALL4_STATUS_INVALID_ARGUMENT);
    printf("ok moe_layer errors\n");
}

/* FP8 e4m3 (no infinities; 0x7f and 0xff are NaN, never generated here). */
static float e4m3(uint8_t b) {
    int exponent = (b >> 3) & 15, mantissa = b & 7;
    float magnitude = exponent == 0 ? ldexpf((float)mantissa / 8.0f, -6) : ldexpf(1.0f + (float)mantissa / 8.0f, exponent - 7);
    return b & 0x80 ? -magnitude : magnitude;
}

/* FP4 e2m1. */
static float e2m1(uint8_t nibble) {
    static const float magnitudes[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    return nibble & 8 ? -magnitudes[nibble & 7] : magnitudes[nibble & 7];
}

static uint8_t fp8_code(unsigned i) {
    uint8_t code = (uint8_t)((i * 37u + 11u) & 0xff);
    return (code & 0x7f) == 0x7f ? 0x3c : code; /* no NaN */
}

static void dequant(void) {
    enum { ROWS = 130, COLS = 256, GROUP = 64 };
    static uint8_t codes[ROWS * COLS], packed[ROWS * COLS / 2], zeros[ROWS * COLS / GROUP], fp4_scales[ROWS * COLS / 16];
    static uint16_t out[ROWS * COLS], int4_scales[ROWS * COLS / GROUP];
    static float got[ROWS * COLS], want[ROWS * COLS];
    float block_scales[2 * 2] = {0.5f, 2.0f, 0.25f, 4.0f};
    const float scale = 0.0375f, global_scale = 448.0f;
    for (unsigned i = 0; i < ROWS * COLS; i++) codes[i] = fp8_code(i);
    for (unsigned i = 0; i < ROWS * COLS / 2; i++) packed[i] = (uint8_t)((i * 29u + 3u) & 0xff);
    for (unsigned i = 0; i < ROWS * COLS / GROUP; i++) {
        zeros[i] = (uint8_t)(i % 16);
        int4_scales[i] = to_bf16(0.01f * (float)(1 + i % 13));
    }
    for (unsigned i = 0; i < ROWS * COLS / 16; i++) fp4_scales[i] = (uint8_t)(0x30 + i % 24); /* positive e4m3 */
    uint64_t codes_dev = upload(codes, sizeof codes), packed_dev = upload(packed, sizeof packed);
    uint64_t zeros_dev = upload(zeros, sizeof zeros), int4_scales_dev = upload(int4_scales, sizeof int4_scales);
    uint64_t fp4_scales_dev = upload(fp4_scales, sizeof fp4_scales), block_scales_dev = upload(block_scales, sizeof block_scales);
    uint64_t out_dev = upload(NULL, sizeof out);

    CHECK(small4_dequant_fp8(device, codes_dev, scale, out_dev, ROWS, COLS));
    CHECK(small4_device_read(device, out, out_dev, sizeof out));
    for (int i = 0; i < ROWS * COLS; i++) {
        want[i] = e4m3(codes[i]) * scale;
        got[i] = from_bf16(out[i]);
    }
    expect_close("dequant_fp8", got, want, ROWS * COLS, 1.0f / 128.0f);

    CHECK(small4_dequant_fp8_block128(device, codes_dev, block_scales_dev, out_dev, ROWS, COLS));
    CHECK(small4_device_read(device, out, out_dev, sizeof out));
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < COLS; c++) {
            want[r * COLS + c] = e4m3(codes[r * COLS + c]) * block_scales[(r / 128) * 2 + c / 128];
            got[r * COLS + c] = from_bf16(out[r * COLS + c]);
        }
    expect_close("dequant_fp8_block128", got, want, ROWS * COLS, 1.0f / 128.0f);

    for (int with_zeros = 0; with_zeros < 2; with_zeros++) {
        CHECK(small4_dequant_int4(device, packed_dev, int4_scales_dev, with_zeros ? zeros_dev : 0, out_dev, ROWS, COLS, GROUP));
        CHECK(small4_device_read(device, out, out_dev, sizeof out));
        for (int r = 0; r < ROWS; r++)
            for (int c = 0; c < COLS; c++) {
                int i = r * COLS + c, g = i / GROUP;
                int q = (packed[i / 2] >> (c % 2 ? 4 : 0)) & 15;
                want[i] = (float)(q - (with_zeros ? zeros[g] : 8)) * from_bf16(int4_scales[g]);
                got[i] = from_bf16(out[i]);
            }
        expect_close(with_zeros ? "dequant_int4 zero points" : "dequant_int4", got, want, ROWS * COLS, 1.0f / 128.0f);
    }

    CHECK(small4_dequant_nvfp4(device, packed_dev, fp4_scales_dev, global_scale, out_dev, ROWS, COLS));
    CHECK(small4_device_read(device, out, out_dev, sizeof out));
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < COLS; c++) {
            int i = r * COLS + c;
            uint8_t q = (uint8_t)((packed[i / 2] >> (c % 2 ? 4 : 0)) & 15);
            want[i] = e2m1(q) * (e4m3(fp4_scales[i / 16]) / global_scale);
            got[i] = from_bf16(out[i]);
        }
    expect_close("dequant_nvfp4", got, want, ROWS * COLS, 1.0f / 128.0f);

    expect_status("dequant_int4 with a group of 48", small4_dequant_int4(device, packed_dev, int4_scales_dev, 0, out_dev, ROWS, COLS, 48), SMALL4_STATUS_INVALID_ARGUMENT);
    printf("ok dequant errors\n");
    RELEASE_ALL(codes_dev, packed_dev, zeros_dev, int4_scales_dev, fp4_scales_dev, block_scales_dev, out_dev);
}

/* One role's matrices (`experts` of [rows, cols]) in `format`, with codes drawn from `seed`, and their values as the
 * GEMM sees them (dequantised, rounded to bf16) in `values`. The storage arrays are large enough for the biggest set. */
typedef struct {
    uint8_t data[MOE_EXPERTS * MOE_MATRIX];
    uint8_t scales[MOE_EXPERTS * MOE_MATRIX / 16];
    uint8_t zeros[MOE_EXPERTS * MOE_MATRIX / 64];
    float per_matrix[MOE_EXPERTS];
    Small4ExpertMatrices set;
} QuantSet;

static void quantise_set(QuantSet *q, uint32_t format, int experts, int rows, int cols, unsigned seed, float *values) {
    const int n = rows * cols, group = 64;
    memset(&q->set, 0, sizeof q->set);
    q->set.format = format;
    q->set.data = q->data;
    for (int e = 0; e < experts; e++) {
        for (int i = 0; i < n; i++) {
            unsigned at = (unsigned)(e * n + i) * 2654435761u + seed;
            int c = i % cols, g = (e * n + i) / group;
            float w = 0;
            if (format == SMALL4_WEIGHT_FORMAT_FP8 || format == SMALL4_WEIGHT_FORMAT_FP8_BLOCK128) {
                /* Exponents up to 7 (|code| <= 1.875) and a sign: weights of a few hundredths after the scale. */
                uint8_t code = (uint8_t)(((at >> 8) & 0x3f) | ((at >> 20) & 0x80));
                q->data[e * n + i] = code;
                q->per_matrix[e] = 0.04f + 0.01f * (float)e;
                w = e4m3(code) * q->per_matrix[e];
            } else {
                uint8_t nibble = (uint8_t)((at >> 12) & 15);
                uint8_t *byte = &q->data[(e * n + i) / 2];
                *byte = (uint8_t)(c % 2 ? (*byte & 0x0f) | (nibble << 4) : (*byte & 0xf0) | nibble);
                if (format == SMALL4_WEIGHT_FORMAT_INT4) {
                    uint16_t *scales = (uint16_t *)q->scales;
                    scales[g] = to_bf16(0.004f * (float)(1 + g % 7));
                    q->zeros[g] = (uint8_t)(g % 16);
                    w = (float)((int)nibble - q->zeros[g]) * from_bf16(scales[g]);
                } else {
                    q->scales[(e * n + i) / 16] = (uint8_t)(0x28 + ((e * n + i) / 16) % 8); /* e4m3 0.25 .. 0.47 */
                    q->per_matrix[e] = 8.0f + (float)e;
                    w = e2m1(nibble) * (e4m3(q->scales[(e * n + i) / 16]) / q->per_matrix[e]);
                }
            }
            values[e * n + i] = from_bf16(to_bf16(w));
        }
    }
    if (format == SMALL4_WEIGHT_FORMAT_FP8) q->set.scales = q->per_matrix;
    if (format == SMALL4_WEIGHT_FORMAT_FP8_BLOCK128) q->set.scales = q->per_matrix; /* one 128x128 block a matrix here */
    if (format == SMALL4_WEIGHT_FORMAT_INT4) {
        q->set.scales = q->scales;
        q->set.zeros = q->zeros;
        q->set.group = group;
    }
    if (format == SMALL4_WEIGHT_FORMAT_NVFP4) {
        q->set.scales = q->scales;
        q->set.global_scales = q->per_matrix;
    }
}

/* A MoE layer in every quantised checkpoint format (the shared expert in the same format), through
 * small4_moe_layer_open, against the C computation over the dequantised weights. */
static void moe_layer_quantised(void) {
    static QuantSet w1, w3, w2, shared_w1, shared_w3, shared_w2;
    static float w1_f[MOE_EXPERTS * MOE_MATRIX], w3_f[MOE_EXPERTS * MOE_MATRIX], w2_f[MOE_EXPERTS * MOE_MATRIX], shared_f[3 * MOE_MATRIX];
    static uint16_t x[MOE_TOKENS * MOE_DIM];
    static float want[MOE_TOKENS * MOE_DIM];
    int32_t ids[MOE_TOKENS * MOE_K];
    float weights[MOE_TOKENS * MOE_K];
    const uint32_t formats[] = {SMALL4_WEIGHT_FORMAT_FP8, SMALL4_WEIGHT_FORMAT_FP8_BLOCK128, SMALL4_WEIGHT_FORMAT_INT4, SMALL4_WEIGHT_FORMAT_NVFP4};
    const char *names[] = {"moe_layer fp8", "moe_layer fp8_block128", "moe_layer int4 zero points", "moe_layer nvfp4"};
    for (unsigned i = 0; i < MOE_TOKENS * MOE_DIM; i++) x[i] = to_bf16(pattern(i + 7919u * 7000u, 1.0f));
    for (size_t f = 0; f < sizeof formats / sizeof formats[0]; f++) {
        quantise_set(&w1, formats[f], MOE_EXPERTS, MOE_HIDDEN, MOE_DIM, 11u, w1_f);
        quantise_set(&w3, formats[f], MOE_EXPERTS, MOE_HIDDEN, MOE_DIM, 22u, w3_f);
        quantise_set(&w2, formats[f], MOE_EXPERTS, MOE_DIM, MOE_HIDDEN, 33u, w2_f);
        quantise_set(&shared_w1, formats[f], 1, MOE_HIDDEN, MOE_DIM, 44u, shared_f);
        quantise_set(&shared_w3, formats[f], 1, MOE_HIDDEN, MOE_DIM, 55u, shared_f + MOE_MATRIX);
        quantise_set(&shared_w2, formats[f], 1, MOE_DIM, MOE_HIDDEN, 66u, shared_f + 2 * MOE_MATRIX);
        moe_reference(x, w1_f, w3_f, w2_f, shared_f, NULL, ids, weights, want);
        Small4MoeLayer *layer = NULL;
        CHECK(small4_moe_layer_open(device, MOE_EXPERTS, MOE_DIM, MOE_HIDDEN, &w1.set, &w3.set, &w2.set, &shared_w1.set, &shared_w3.set, &shared_w2.set, &layer));
        moe_forward_check(names[f], layer, x, ids, weights, want);
        if (formats[f] == SMALL4_WEIGHT_FORMAT_FP8) {
            /* W8A8: the same layer with e4m3 activations at static scales, against the C computation with the inputs
             * of both projections rounded to e4m3; then back to bf16 activations. */
            const float act_scales[2] = {1.0f / 64.0f, 1.0f / 32.0f};
            static float want_w8a8[MOE_TOKENS * MOE_DIM];
            moe_reference(x, w1_f, w3_f, w2_f, shared_f, act_scales, ids, weights, want_w8a8);
            CHECK(small4_moe_layer_set_fp8_activations(layer, act_scales[0], act_scales[1]));
            moe_forward_check("moe_layer fp8 w8a8", layer, x, ids, weights, want_w8a8);
            expect_status("fp8 activations with a negative scale", small4_moe_layer_set_fp8_activations(layer, -1.0f, act_scales[1]), SMALL4_STATUS_INVALID_ARGUMENT);
            CHECK(small4_moe_layer_set_fp8_activations(layer, 0.0f, 0.0f));
            moe_forward_check("moe_layer fp8 back to bf16 activations", layer, x, ids, weights, want);
        } else {
            expect_status("fp8 activations on experts not in per-tensor fp8", small4_moe_layer_set_fp8_activations(layer, 1.0f, 1.0f), SMALL4_STATUS_INVALID_ARGUMENT);
        }
        small4_moe_layer_free(layer);
    }
    /* An unknown format and an INT4 group that does not divide the columns are refused. */
    Small4ExpertMatrices bad = w1.set;
    bad.format = 9;
    Small4MoeLayer *layer = NULL;
    expect_status("a MoE layer in format 9", small4_moe_layer_open(device, MOE_EXPERTS, MOE_DIM, MOE_HIDDEN, &bad, &w3.set, &w2.set, NULL, NULL, NULL, &layer), SMALL4_STATUS_UNKNOWN_DTYPE);
    quantise_set(&w1, SMALL4_WEIGHT_FORMAT_INT4, MOE_EXPERTS, MOE_HIDDEN, MOE_DIM, 11u, w1_f);
    bad = w1.set;
    bad.group = 48;
    expect_status("a MoE layer with an int4 group of 48", small4_moe_layer_open(device, MOE_EXPERTS, MOE_DIM, MOE_HIDDEN, &bad, &w3.set, &w2.set, NULL, NULL, NULL, &layer), SMALL4_STATUS_INVALID_ARGUMENT);
    printf("ok moe_layer quantised errors\n");
}

static void embedding_gather(void) {
    enum { TOKENS = 3, VOCAB = 10, DIM = 64 };
    static uint16_t table[VOCAB * DIM], out[TOKENS * DIM];
    static float got[TOKENS * DIM], want[TOKENS * DIM];
    int32_t ids[TOKENS] = {7, 0, 7}, bad_ids[TOKENS] = {1, VOCAB, 2};
    for (int i = 0; i < VOCAB * DIM; i++) table[i] = to_bf16(pattern((unsigned)i, 2.0f));
    uint64_t table_dev = upload(table, sizeof table), ids_dev = upload(ids, sizeof ids), out_dev = upload(NULL, sizeof out);
    CHECK(small4_embedding_gather(device, ids_dev, TOKENS, table_dev, VOCAB, DIM, out_dev));
    CHECK(small4_device_read(device, out, out_dev, sizeof out));
    for (int t = 0; t < TOKENS; t++)
        for (int d = 0; d < DIM; d++) {
            want[t * DIM + d] = from_bf16(table[ids[t] * DIM + d]);
            got[t * DIM + d] = from_bf16(out[t * DIM + d]);
        }
    expect_close("embedding_gather", got, want, TOKENS * DIM, 0.0f);
    CHECK(small4_device_write(device, ids_dev, bad_ids, sizeof bad_ids));
    expect_status("embedding_gather of an id past the vocabulary", small4_embedding_gather(device, ids_dev, TOKENS, table_dev, VOCAB, DIM, out_dev), SMALL4_STATUS_OUT_OF_RANGE);
    printf("ok embedding_gather errors\n");
    RELEASE_ALL(table_dev, ids_dev, out_dev);
}

/* Seeded sampling: greedy rows equal the argmax, a tiny top-p keeps only the top token, a row's token depends on its
 * logits, settings, seed and step only (same in another row and in a second call), every token lies in its row's
 * nucleus, and different seeds draw different tokens. */
static void sampling(void) {
    enum { ROWS = 4, VOCAB = 1000, SEEDS = 32 };
    static float logits[ROWS * VOCAB], temperature[ROWS] = {0.0f, 1.0f, 0.8f, 0.8f}, top_p[ROWS] = {1.0f, 1e-7f, 0.9f, 0.9f};
    uint64_t seeds[ROWS] = {1, 2, 7, 7};
    int32_t steps[ROWS] = {0, 0, 3, 3}, ids[ROWS], again[ROWS];
    for (int i = 0; i < 3 * VOCAB; i++) logits[i] = pattern((unsigned)i + 303u, 4.0f);
    memcpy(logits + 3 * VOCAB, logits + 2 * VOCAB, VOCAB * sizeof(float)); /* row 3 repeats row 2 */
    uint64_t logits_dev = upload(logits, sizeof logits), temperature_dev = upload(temperature, sizeof temperature);
    uint64_t top_p_dev = upload(top_p, sizeof top_p), seeds_dev = upload(seeds, sizeof seeds), steps_dev = upload(steps, sizeof steps);
    uint64_t ids_dev = upload(NULL, sizeof ids);
    CHECK(small4_sample(device, logits_dev, ROWS, VOCAB, temperature_dev, top_p_dev, seeds_dev, steps_dev, ids_dev));
    CHECK(small4_device_read(device, ids, ids_dev, sizeof ids));
    CHECK(small4_sample(device, logits_dev, ROWS, VOCAB, temperature_dev, top_p_dev, seeds_dev, steps_dev, ids_dev));
    CHECK(small4_device_read(device, again, ids_dev, sizeof again));
    for (int r = 0; r < 2; r++) {
        int best = 0;
        for (int v = 1; v < VOCAB; v++)
            if (logits[r * VOCAB + v] > logits[r * VOCAB + best]) best = v;
        if (ids[r] != best) {
            fprintf(stderr, "sample row %d (%s): %d, argmax %d\n", r, r == 0 ? "greedy" : "top_p 1e-7", ids[r], best);
            exit(1);
        }
    }
    if (ids[2] != ids[3] || memcmp(ids, again, sizeof ids) != 0) {
        fprintf(stderr, "sample not reproducible: %d %d %d %d then %d %d %d %d\n", ids[0], ids[1], ids[2], ids[3], again[0], again[1], again[2], again[3]);
        exit(1);
    }
    /* The nucleus of row 2: the mass of the tokens more likely than the drawn one stays below top_p. */
    double max_logit = -1e30, total = 0, above = 0;
    for (int v = 0; v < VOCAB; v++)
        if (logits[2 * VOCAB + v] > max_logit) max_logit = logits[2 * VOCAB + v];
    for (int v = 0; v < VOCAB; v++) total += exp((logits[2 * VOCAB + v] - max_logit) / temperature[2]);
    int distinct = 0;
    static int seen[VOCAB];
    memset(seen, 0, sizeof seen);
    for (int seed = 0; seed < SEEDS; seed++) {
        uint64_t row_seed[ROWS] = {1, 2, (uint64_t)seed * 7919u + 1u, 7};
        CHECK(small4_device_write(device, seeds_dev, row_seed, sizeof row_seed));
        CHECK(small4_sample(device, logits_dev, ROWS, VOCAB, temperature_dev, top_p_dev, seeds_dev, steps_dev, ids_dev));
        CHECK(small4_device_read(device, again, ids_dev, sizeof again));
        int id = again[2];
        if (id < 0 || id >= VOCAB) {
            fprintf(stderr, "sample: id %d outside the vocabulary\n", id);
            exit(1);
        }
        above = 0;
        for (int v = 0; v < VOCAB; v++)
            if (logits[2 * VOCAB + v] > logits[2 * VOCAB + id]) above += exp((logits[2 * VOCAB + v] - max_logit) / temperature[2]);
        if (above / total >= 0.9 + 1e-4) {
            fprintf(stderr, "sample: token %d outside the 0.9 nucleus (mass above it %g)\n", id, above / total);
            exit(1);
        }
        if (!seen[id]++) distinct++;
    }
    if (distinct < 4) {
        fprintf(stderr, "sample: %d seeds drew only %d distinct tokens\n", SEEDS, distinct);
        exit(1);
    }
    printf("ok sample\n");
    expect_status("sample without temperatures", small4_sample(device, logits_dev, ROWS, VOCAB, 0, top_p_dev, seeds_dev, steps_dev, ids_dev), SMALL4_STATUS_INVALID_ARGUMENT);
    printf("ok sample errors\n");
    RELEASE_ALL(logits_dev, temperature_dev, top_p_dev, seeds_dev, steps_dev, ids_dev);
}

/* RoPE on interleaved pairs, in double: pair i of the bf16 values `in` turned by `position * inv_freq[i]`, times
 * `scale`, into `out`. */
static void rope_pairs(const uint16_t *in, int pairs, int position, const float *inv_freq, double scale, float *out) {
    for (int i = 0; i < pairs; i++) {
        double angle = (double)position * inv_freq[i], a = from_bf16(in[2 * i]), b = from_bf16(in[2 * i + 1]);
        out[2 * i] = (float)((a * cos(angle) - b * sin(angle)) * scale);
        out[2 * i + 1] = (float)((a * sin(angle) + b * cos(angle)) * scale);
    }
}

/* RoPE of q (every head's last ROPE_DIM values, then the llama-4 query scale on all of q) and of k_rope inside wider
 * rows (the other values of those rows untouched). */
static void rope(void) {
    enum { TOKENS = 3, HEADS = 2, HEAD_DIM = 24, ROPE_DIM = 16, K_OFFSET = 8, K_STRIDE = 32 };
    const int32_t positions[TOKENS] = {0, 5, 70};
    const float beta = 0.1f;
    const int original_max = 64;
    static uint16_t q[TOKENS * HEADS * HEAD_DIM], k[TOKENS * K_STRIDE], q_out[TOKENS * HEADS * HEAD_DIM], k_out[TOKENS * K_STRIDE];
    static float inv_freq[ROPE_DIM / 2], got[TOKENS * HEADS * HEAD_DIM], want[TOKENS * HEADS * HEAD_DIM];
    static float got_k[TOKENS * K_STRIDE], want_k[TOKENS * K_STRIDE];
    for (int i = 0; i < TOKENS * HEADS * HEAD_DIM; i++) q[i] = to_bf16(pattern((unsigned)i + 101u, 2.0f));
    for (int i = 0; i < TOKENS * K_STRIDE; i++) k[i] = to_bf16(pattern((unsigned)i + 202u, 2.0f));
    for (int i = 0; i < ROPE_DIM / 2; i++) inv_freq[i] = powf(10000.0f, -(float)i / (ROPE_DIM / 2));
    uint64_t q_dev = upload(q, sizeof q), k_dev = upload(k, sizeof k);
    uint64_t positions_dev = upload(positions, sizeof positions), freq_dev = upload(inv_freq, sizeof inv_freq);
    CHECK(small4_rope_q_k(device, q_dev, TOKENS, HEADS, HEAD_DIM, k_dev, K_OFFSET, K_STRIDE, positions_dev, freq_dev, ROPE_DIM, beta, original_max));
    CHECK(small4_device_read(device, q_out, q_dev, sizeof q_out));
    CHECK(small4_device_read(device, k_out, k_dev, sizeof k_out));
    for (int t = 0; t < TOKENS; t++) {
        double scale = 1.0 + beta * log(1.0 + (double)(positions[t] / original_max));
        for (int h = 0; h < HEADS; h++) {
            const int base = (t * HEADS + h) * HEAD_DIM;
            for (int d = 0; d < HEAD_DIM - ROPE_DIM; d++) want[base + d] = (float)(from_bf16(q[base + d]) * scale);
            const int at = base + HEAD_DIM - ROPE_DIM;
            rope_pairs(&q[at], ROPE_DIM / 2, positions[t], inv_freq, scale, &want[at]);
        }
        for (int c = 0; c < K_STRIDE; c++) want_k[t * K_STRIDE + c] = from_bf16(k[t * K_STRIDE + c]);
        rope_pairs(&k[t * K_STRIDE + K_OFFSET], ROPE_DIM / 2, positions[t], inv_freq, 1.0, &want_k[t * K_STRIDE + K_OFFSET]);
    }
    for (int i = 0; i < TOKENS * HEADS * HEAD_DIM; i++) got[i] = from_bf16(q_out[i]);
    for (int i = 0; i < TOKENS * K_STRIDE; i++) got_k[i] = from_bf16(k_out[i]);
    expect_close("rope q", got, want, TOKENS * HEADS * HEAD_DIM, 1.0f / 128.0f);
    expect_close("rope k", got_k, want_k, TOKENS * K_STRIDE, 1.0f / 128.0f);

    expect_status("rope with k at offset 4", small4_rope_q_k(device, q_dev, TOKENS, HEADS, HEAD_DIM, k_dev, 4, K_STRIDE, positions_dev, freq_dev, ROPE_DIM, beta, original_max), SMALL4_STATUS_INVALID_ARGUMENT);
    printf("ok rope errors\n");
    RELEASE_ALL(q_dev, k_dev, positions_dev, freq_dev);
}

/* MLA over a paged cache the program owns: the cache writer (latent RMSNorm, RoPE of k_rope) checked value by value,
 * then attention of two sequences with 2 and 1 query tokens (a chunked prefill and a decode) against a plain C
 * softmax over the cached values, then the errors of a page outside the pool and an unknown dtype. */
enum { MLA_LATENT = 256, MLA_ROPE = 64, MLA_WIDTH = 320, MLA_PAGE = 4, MLA_PAGES = 6, MLA_HEADS = 2 };

static void mla_attention(void) {
    enum { SEQS = 2, MAX_PAGES = 2, TOKENS = 9, Q_TOKENS = 3, ROWS = Q_TOKENS * MLA_HEADS };
    const int32_t block_tables[SEQS * MAX_PAGES] = {4, 1, 2, -1}, seq_lens[SEQS] = {6, 3};
    int32_t token_seq[TOKENS], positions[TOKENS];
    static uint16_t kv[TOKENS * MLA_WIDTH], norm_weight[MLA_LATENT], cache[MLA_PAGES * MLA_PAGE * MLA_WIDTH];
    static uint16_t q_lat[ROWS * MLA_LATENT], q_rope[ROWS * MLA_ROPE], o_lat[ROWS * MLA_LATENT];
    static float inv_freq[MLA_ROPE / 2], got[TOKENS * MLA_WIDTH], want[TOKENS * MLA_WIDTH];
    static float got_o[ROWS * MLA_LATENT], want_o[ROWS * MLA_LATENT];
    const float eps = 1e-6f, softmax_scale = 0.0625f;
    for (int t = 0; t < TOKENS; t++) {
        token_seq[t] = t < 6 ? 0 : 1;
        positions[t] = t < 6 ? t : t - 6;
    }
    for (int i = 0; i < TOKENS * MLA_WIDTH; i++) kv[i] = to_bf16(pattern((unsigned)i, 1.5f));
    for (int c = 0; c < MLA_LATENT; c++) norm_weight[c] = to_bf16(0.75f + (float)(c % 5) / 8.0f);
    for (int l = 0; l < MLA_ROPE / 2; l++) inv_freq[l] = powf(10000.0f, -(float)l / (MLA_ROPE / 2));
    for (int i = 0; i < ROWS * MLA_LATENT; i++) q_lat[i] = to_bf16(pattern((unsigned)i + 7u, 1.0f));
    for (int i = 0; i < ROWS * MLA_ROPE; i++) q_rope[i] = to_bf16(pattern((unsigned)i + 13u, 1.0f));
    uint64_t cache_dev = upload(NULL, sizeof cache), kv_dev = upload(kv, sizeof kv);
    uint64_t norm_dev = upload(norm_weight, sizeof norm_weight), freq_dev = upload(inv_freq, sizeof inv_freq);
    uint64_t q_lat_dev = upload(q_lat, sizeof q_lat), q_rope_dev = upload(q_rope, sizeof q_rope), o_dev = upload(NULL, sizeof o_lat);
    Small4MlaCache mla_cache = {cache_dev, MLA_PAGES, MLA_PAGE, SMALL4_CACHE_DTYPE_BF16, 1.0f};
    Small4MlaBatch batch = {SEQS, MAX_PAGES, block_tables, seq_lens};

    CHECK(small4_mla_cache_write(device, &mla_cache, &batch, kv_dev, MLA_WIDTH, TOKENS, norm_dev, eps, freq_dev, token_seq, positions));
    CHECK(small4_device_read(device, cache, cache_dev, sizeof cache));
    /* The cache slot of token t: its sequence's page for the position, then the row in the page. */
    const uint16_t *slot[TOKENS];
    for (int t = 0; t < TOKENS; t++) {
        int page = block_tables[token_seq[t] * MAX_PAGES + positions[t] / MLA_PAGE];
        slot[t] = cache + ((size_t)page * MLA_PAGE + (size_t)(positions[t] % MLA_PAGE)) * MLA_WIDTH;
        const uint16_t *row = kv + t * MLA_WIDTH;
        double mean_sq = 0;
        for (int c = 0; c < MLA_LATENT; c++) mean_sq += (double)from_bf16(row[c]) * from_bf16(row[c]);
        double inv_rms = 1.0 / sqrt(mean_sq / MLA_LATENT + eps);
        for (int c = 0; c < MLA_LATENT; c++) want[t * MLA_WIDTH + c] = (float)(from_bf16(row[c]) * inv_rms) * from_bf16(norm_weight[c]);
        rope_pairs(&row[MLA_LATENT], MLA_ROPE / 2, positions[t], inv_freq, 1.0, &want[t * MLA_WIDTH + MLA_LATENT]);
        for (int c = 0; c < MLA_WIDTH; c++) got[t * MLA_WIDTH + c] = from_bf16(slot[t][c]);
    }
    expect_close("mla_cache_write", got, want, TOKENS * MLA_WIDTH, 1.0f / 128.0f);

    /* Sequence 0 queries its last two tokens (positions 4 and 5), sequence 1 its last (position 2). */
    const int32_t q_start[SEQS + 1] = {0, 2, 3};
    CHECK(small4_mla_attention(device, &mla_cache, &batch, q_start, MLA_HEADS, q_lat_dev, q_rope_dev, o_dev, softmax_scale));
    CHECK(small4_device_read(device, o_lat, o_dev, sizeof o_lat));
    for (int q = 0; q < Q_TOKENS; q++) {
        int seq = q < 2 ? 0 : 1, first_token = seq == 0 ? 0 : 6, count = q_start[seq + 1] - q_start[seq];
        int position = seq_lens[seq] - count + (q - q_start[seq]);
        for (int h = 0; h < MLA_HEADS; h++) {
            int r = q * MLA_HEADS + h;
            double scores[6], max_score = -1e30, total = 0;
            for (int j = 0; j <= position; j++) {
                const uint16_t *cached = slot[first_token + j];
                double dot = 0;
                for (int c = 0; c < MLA_LATENT; c++) dot += (double)from_bf16(q_lat[r * MLA_LATENT + c]) * from_bf16(cached[c]);
                for (int c = 0; c < MLA_ROPE; c++) dot += (double)from_bf16(q_rope[r * MLA_ROPE + c]) * from_bf16(cached[MLA_LATENT + c]);
                scores[j] = dot * softmax_scale;
                if (scores[j] > max_score) max_score = scores[j];
            }
            for (int j = 0; j <= position; j++) total += (scores[j] = exp(scores[j] - max_score));
            for (int c = 0; c < MLA_LATENT; c++) {
                double o = 0;
                for (int j = 0; j <= position; j++) o += scores[j] / total * from_bf16(slot[first_token + j][c]);
                want_o[r * MLA_LATENT + c] = (float)o;
                got_o[r * MLA_LATENT + c] = from_bf16(o_lat[r * MLA_LATENT + c]);
            }
        }
    }
    expect_close("mla_attention", got_o, want_o, ROWS * MLA_LATENT, 1.0f / 64.0f);

    /* A page outside the pool is refused before any launch; so is an unknown cache dtype. */
    const int32_t bad_tables[SEQS * MAX_PAGES] = {4, MLA_PAGES, 2, -1};
    Small4MlaBatch bad_batch = {SEQS, MAX_PAGES, bad_tables, seq_lens};
    expect_status("mla_attention with a page outside the pool", small4_mla_attention(device, &mla_cache, &bad_batch, q_start, MLA_HEADS, q_lat_dev, q_rope_dev, o_dev, softmax_scale), SMALL4_STATUS_OUT_OF_RANGE);
    Small4MlaCache bad_cache = mla_cache;
    bad_cache.dtype = 7;
    expect_status("mla_attention with cache dtype 7", small4_mla_attention(device, &bad_cache, &batch, q_start, MLA_HEADS, q_lat_dev, q_rope_dev, o_dev, softmax_scale), SMALL4_STATUS_UNKNOWN_DTYPE);
    printf("ok mla errors\n");
    RELEASE_ALL(cache_dev, kv_dev, norm_dev, freq_dev, q_lat_dev, q_rope_dev, o_dev);
}

/* The vision tower's kernels: the patch unfold, 2D RoPE, block-diagonal attention over two images, bias + GELU, the
 * patch merger's unfold and the row scatter, each against plain C, then one bad call each. */
static void vision(void) {
    /* Patch unfold: a 3-channel 4x6 image in patches of 2 (6 patches of 12 values), rows padded to 16. */
    enum { CH = 3, IMG_H = 4, IMG_W = 6, PATCH = 2, PATCHES = (IMG_H / PATCH) * (IMG_W / PATCH), K_PADDED = 16 };
    static float pixels[CH * IMG_H * IMG_W], got[PATCHES * K_PADDED], want[PATCHES * K_PADDED];
    static uint16_t unfolded[PATCHES * K_PADDED];
    for (int i = 0; i < CH * IMG_H * IMG_W; i++) pixels[i] = from_bf16(to_bf16(pattern((unsigned)i + 101u, 2.0f)));
    uint64_t pixels_dev = upload(pixels, sizeof pixels), unfolded_dev = upload(NULL, sizeof unfolded);
    CHECK(small4_patch_im2col(device, pixels_dev, CH, IMG_H, IMG_W, PATCH, unfolded_dev, K_PADDED));
    CHECK(small4_device_read(device, unfolded, unfolded_dev, sizeof unfolded));
    for (int gy = 0; gy < IMG_H / PATCH; gy++) {
        for (int gx = 0; gx < IMG_W / PATCH; gx++) {
            float *row = want + (gy * (IMG_W / PATCH) + gx) * K_PADDED;
            for (int k = 0; k < K_PADDED; k++) row[k] = 0.0f;
            for (int c = 0; c < CH; c++)
                for (int ky = 0; ky < PATCH; ky++)
                    for (int kx = 0; kx < PATCH; kx++) row[(c * PATCH + ky) * PATCH + kx] = pixels[(c * IMG_H + gy * PATCH + ky) * IMG_W + gx * PATCH + kx];
        }
    }
    for (int i = 0; i < PATCHES * K_PADDED; i++) got[i] = from_bf16(unfolded[i]);
    expect_close("patch_im2col", got, want, PATCHES * K_PADDED, 0.0f);

    /* 2D RoPE of q and k: three tokens of two heads of 8 (the first two pairs turn by the grid row, the last two by
     * the column). */
    enum { R_TOKENS = 3, R_HEADS = 2, R_DIM = 8, R_QUARTER = R_DIM / 4, R_LEN = R_TOKENS * R_HEADS * R_DIM };
    const int32_t grid_rows[R_TOKENS] = {0, 3, 40}, grid_cols[R_TOKENS] = {1, 0, 17};
    const float freq_rows[R_QUARTER] = {1.0f, 0.01f}, freq_cols[R_QUARTER] = {0.5f, 0.001f};
    static uint16_t rq[R_LEN], rk[R_LEN], rq_out[R_LEN], rk_out[R_LEN];
    static float got_q[R_LEN], want_q[R_LEN], got_k[R_LEN], want_k[R_LEN];
    for (int i = 0; i < R_LEN; i++) {
        rq[i] = to_bf16(pattern((unsigned)i + 211u, 1.5f));
        rk[i] = to_bf16(pattern((unsigned)i + 307u, 1.5f));
    }
    uint64_t rq_dev = upload(rq, sizeof rq), rk_dev = upload(rk, sizeof rk);
    uint64_t rows_dev = upload(grid_rows, sizeof grid_rows), cols_dev = upload(grid_cols, sizeof grid_cols);
    uint64_t freq_rows_dev = upload(freq_rows, sizeof freq_rows), freq_cols_dev = upload(freq_cols, sizeof freq_cols);
    CHECK(small4_rope_2d(device, rq_dev, rk_dev, R_TOKENS, R_HEADS, R_DIM, rows_dev, cols_dev, freq_rows_dev, freq_cols_dev));
    CHECK(small4_device_read(device, rq_out, rq_dev, sizeof rq_out));
    CHECK(small4_device_read(device, rk_out, rk_dev, sizeof rk_out));
    for (int t = 0; t < R_TOKENS; t++) {
        for (int h = 0; h < R_HEADS; h++) {
            const int base = (t * R_HEADS + h) * R_DIM, cols_at = base + 2 * R_QUARTER;
            rope_pairs(&rq[base], R_QUARTER, grid_rows[t], freq_rows, 1.0, &want_q[base]);
            rope_pairs(&rq[cols_at], R_QUARTER, grid_cols[t], freq_cols, 1.0, &want_q[cols_at]);
            rope_pairs(&rk[base], R_QUARTER, grid_rows[t], freq_rows, 1.0, &want_k[base]);
            rope_pairs(&rk[cols_at], R_QUARTER, grid_cols[t], freq_cols, 1.0, &want_k[cols_at]);
        }
    }
    for (int i = 0; i < R_LEN; i++) {
        got_q[i] = from_bf16(rq_out[i]);
        got_k[i] = from_bf16(rk_out[i]);
    }
    expect_close("rope_2d q", got_q, want_q, R_LEN, 1.0f / 128.0f);
    expect_close("rope_2d k", got_k, want_k, R_LEN, 1.0f / 128.0f);

    /* Attention of two heads over two images of 3 and 2 tokens: a token sees the keys of its own image only. */
    enum { A_TOKENS = 5, A_HEADS = 2, A_DIM = 64, A_LEN = A_TOKENS * A_HEADS * A_DIM };
    const size_t segment_lens[2] = {3, 2};
    const float scale = 0.125f;
    static uint16_t aq[A_LEN], ak[A_LEN], av[A_LEN], a_out[A_LEN];
    static float got_a[A_LEN], want_a[A_LEN];
    for (int i = 0; i < A_LEN; i++) {
        aq[i] = to_bf16(pattern((unsigned)i + 401u, 1.0f));
        ak[i] = to_bf16(pattern((unsigned)i + 503u, 1.0f));
        av[i] = to_bf16(pattern((unsigned)i + 607u, 1.0f));
    }
    uint64_t aq_dev = upload(aq, sizeof aq), ak_dev = upload(ak, sizeof ak), av_dev = upload(av, sizeof av), a_out_dev = upload(NULL, sizeof a_out);
    CHECK(small4_vision_attention(device, aq_dev, ak_dev, av_dev, a_out_dev, A_HEADS, segment_lens, 2, scale));
    CHECK(small4_device_read(device, a_out, a_out_dev, sizeof a_out));
    for (int t = 0; t < A_TOKENS; t++) {
        const int first = t < 3 ? 0 : 3, end = t < 3 ? 3 : 5;
        for (int h = 0; h < A_HEADS; h++) {
            double scores[3], max_score = -1e30, total = 0;
            for (int j = first; j < end; j++) {
                double dot = 0;
                for (int d = 0; d < A_DIM; d++) dot += (double)from_bf16(aq[(t * A_HEADS + h) * A_DIM + d]) * from_bf16(ak[(j * A_HEADS + h) * A_DIM + d]);
                scores[j - first] = dot * scale;
                if (scores[j - first] > max_score) max_score = scores[j - first];
            }
            for (int j = first; j < end; j++) total += (scores[j - first] = exp(scores[j - first] - max_score));
            for (int d = 0; d < A_DIM; d++) {
                double o = 0;
                for (int j = first; j < end; j++) o += scores[j - first] / total * from_bf16(av[(j * A_HEADS + h) * A_DIM + d]);
                want_a[(t * A_HEADS + h) * A_DIM + d] = (float)o;
            }
        }
    }
    for (int i = 0; i < A_LEN; i++) got_a[i] = from_bf16(a_out[i]);
    expect_close("vision_attention", got_a, want_a, A_LEN, 1.0f / 64.0f);

    /* Bias + exact GELU on three rows of 8. */
    enum { B_ROWS = 3, B_COLS = 8 };
    static uint16_t bx[B_ROWS * B_COLS], bias[B_COLS], bx_out[B_ROWS * B_COLS];
    static float got_b[B_ROWS * B_COLS], want_b[B_ROWS * B_COLS];
    for (int i = 0; i < B_ROWS * B_COLS; i++) bx[i] = to_bf16(pattern((unsigned)i + 709u, 3.0f));
    for (int c = 0; c < B_COLS; c++) bias[c] = to_bf16(pattern((unsigned)c + 811u, 1.0f));
    uint64_t bx_dev = upload(bx, sizeof bx), bias_dev = upload(bias, sizeof bias);
    CHECK(small4_bias_act(device, bx_dev, B_ROWS, B_COLS, bias_dev, SMALL4_ACTIVATION_GELU));
    CHECK(small4_device_read(device, bx_out, bx_dev, sizeof bx_out));
    for (int i = 0; i < B_ROWS * B_COLS; i++) {
        double v = (double)from_bf16(bx[i]) + from_bf16(bias[i % B_COLS]);
        want_b[i] = (float)(0.5 * v * (1.0 + erf(v / sqrt(2.0))));
        got_b[i] = from_bf16(bx_out[i]);
    }
    expect_close("bias_act", got_b, want_b, B_ROWS * B_COLS, 1.0f / 128.0f);

    /* Patch merge (2x2) of a 2x4 and a 2x2 patch grid, hidden 3: three merged rows of 12. */
    enum { M_HIDDEN = 3, M_MERGE = 2, M_GROUP = M_MERGE * M_MERGE, M_TOKENS = 8 + 4, M_ROWS = 3, M_WIDTH = M_HIDDEN * M_GROUP };
    const size_t grids[2 * 2] = {2, 4, 2, 2};
    static uint16_t mx[M_TOKENS * M_HIDDEN], merged[M_ROWS * M_WIDTH];
    static float got_m[M_ROWS * M_WIDTH], want_m[M_ROWS * M_WIDTH];
    for (int i = 0; i < M_TOKENS * M_HIDDEN; i++) mx[i] = to_bf16(pattern((unsigned)i + 911u, 2.0f));
    uint64_t mx_dev = upload(mx, sizeof mx), merged_dev = upload(NULL, sizeof merged);
    CHECK(small4_patch_merge(device, mx_dev, M_HIDDEN, grids, 2, M_MERGE, merged_dev));
    CHECK(small4_device_read(device, merged, merged_dev, sizeof merged));
    int r = 0, first_token = 0;
    for (int image = 0; image < 2; image++) {
        const int rows = (int)grids[2 * image], cols = (int)grids[2 * image + 1];
        for (int by = 0; by < rows / M_MERGE; by++) {
            for (int bx_ = 0; bx_ < cols / M_MERGE; bx_++, r++) {
                for (int di = 0; di < M_MERGE; di++) {
                    for (int dj = 0; dj < M_MERGE; dj++) {
                        const int token = first_token + (by * M_MERGE + di) * cols + bx_ * M_MERGE + dj;
                        for (int c = 0; c < M_HIDDEN; c++) want_m[r * M_WIDTH + c * M_GROUP + di * M_MERGE + dj] = from_bf16(mx[token * M_HIDDEN + c]);
                    }
                }
            }
        }
        first_token += rows * cols;
    }
    for (int i = 0; i < M_ROWS * M_WIDTH; i++) got_m[i] = from_bf16(merged[i]);
    expect_close("patch_merge", got_m, want_m, M_ROWS * M_WIDTH, 0.0f);

    /* Scatter two rows of 4 into rows 3 and 0 of five; rows 1, 2 and 4 keep their values. */
    enum { S_ROWS = 5, S_COLS = 4, S_COUNT = 2 };
    const size_t targets[S_COUNT] = {3, 0};
    static uint16_t src[S_COUNT * S_COLS], base[S_ROWS * S_COLS], scattered[S_ROWS * S_COLS];
    static float got_s[S_ROWS * S_COLS], want_s[S_ROWS * S_COLS];
    for (int i = 0; i < S_COUNT * S_COLS; i++) src[i] = to_bf16(pattern((unsigned)i + 1013u, 1.0f));
    for (int i = 0; i < S_ROWS * S_COLS; i++) want_s[i] = from_bf16(base[i] = to_bf16(pattern((unsigned)i + 1117u, 1.0f)));
    for (int i = 0; i < S_COUNT; i++)
        for (int c = 0; c < S_COLS; c++) want_s[targets[i] * S_COLS + c] = from_bf16(src[i * S_COLS + c]);
    uint64_t src_dev = upload(src, sizeof src), scattered_dev = upload(base, sizeof base);
    CHECK(small4_scatter_rows(device, src_dev, S_COLS, targets, S_COUNT, scattered_dev, S_ROWS));
    CHECK(small4_device_read(device, scattered, scattered_dev, sizeof scattered));
    for (int i = 0; i < S_ROWS * S_COLS; i++) got_s[i] = from_bf16(scattered[i]);
    expect_close("scatter_rows", got_s, want_s, S_ROWS * S_COLS, 0.0f);

    /* One bad call each: a side that is not a multiple of the patch, heads of 6 (not a multiple of 4), an empty image,
     * an unknown activation, a grid side that is not a multiple of the merge, a target row past the output. */
    expect_status("patch_im2col of width 5", small4_patch_im2col(device, pixels_dev, CH, IMG_H, 5, PATCH, unfolded_dev, K_PADDED), SMALL4_STATUS_SHAPE);
    expect_status("rope_2d with heads of 6", small4_rope_2d(device, rq_dev, 0, R_TOKENS, R_HEADS, 6, rows_dev, cols_dev, freq_rows_dev, freq_cols_dev), SMALL4_STATUS_INVALID_ARGUMENT);
    const size_t empty_image[2] = {3, 0};
    expect_status("vision_attention with an empty image", small4_vision_attention(device, aq_dev, ak_dev, av_dev, a_out_dev, A_HEADS, empty_image, 2, scale), SMALL4_STATUS_INVALID_ARGUMENT);
    expect_status("bias_act with activation 2", small4_bias_act(device, bx_dev, B_ROWS, B_COLS, bias_dev, 2), SMALL4_STATUS_INVALID_ARGUMENT);
    const size_t odd_grid[2] = {3, 4};
    expect_status("patch_merge of a 3x4 grid", small4_patch_merge(device, mx_dev, M_HIDDEN, odd_grid, 1, M_MERGE, merged_dev), SMALL4_STATUS_SHAPE);
    const size_t past_end[S_COUNT] = {3, S_ROWS};
    expect_status("scatter_rows to row 5 of 5", small4_scatter_rows(device, src_dev, S_COLS, past_end, S_COUNT, scattered_dev, S_ROWS), SMALL4_STATUS_OUT_OF_RANGE);
    printf("ok vision errors\n");
    RELEASE_ALL(pixels_dev, unfolded_dev, rq_dev, rk_dev, rows_dev, cols_dev, freq_rows_dev, freq_cols_dev, aq_dev, ak_dev, av_dev, a_out_dev, bx_dev, bias_dev, mx_dev, merged_dev, src_dev, scattered_dev);
}

/* Every check on one device. */
static void run_all(void) {
    rms_norms();
    silu_mul_and_argmax();
    router();
    moe_layer();
    moe_layer_quantised();
    dequant();
    embedding_gather();
    sampling();
    rope();
    mla_attention();
    vision();
}

int main(void) {
    if (small4_abi_version() != SMALL4_ABI_VERSION) {
        fprintf(stderr, "small4.h is ABI %u but the library is ABI %u\n", (unsigned)SMALL4_ABI_VERSION, small4_abi_version());
        return 1;
    }
    CHECK(small4_device_open_sim(&device));
    run_all();
    small4_device_free(device);
    /* The same calls on CUDA device 0 (small4's own stream) when there is one; a missing GPU is a status, said. */
    Small4Status status = small4_device_open_gpu(0, NULL, &device);
    if (status == SMALL4_STATUS_OK) {
        printf("on the GPU:\n");
        run_all();
        small4_device_free(device);
    } else if (status == SMALL4_STATUS_NO_GPU) {
        printf("SKIPPED the GPU run: %s\n", small4_last_error());
    } else {
        fprintf(stderr, "small4_device_open_gpu: status %d: %s\n", (int)status, small4_last_error());
        return 1;
    }
    printf("all kernels ok\n");
    return 0;
}
