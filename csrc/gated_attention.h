// The one kernel contract of lift_kernels._C: the parameter struct that the CPU and the CUDA
// forward and backward both take (in the spirit of FlashAttention's flash.h), and the
// per-element math they share, written once as __host__ __device__ inline functions.
//
// Layouts (SPEC section 1; every stride in elements, int64, the last dim contiguous):
//   q, out, attn, dout: [B, Nq, Hq, D]      k, v: [B, Nk, Hkv, D]
//   gate, dgate: [B, Nq, Hq] float32        lse: [B, Hq, Nq] float32
//   weights (float32, contiguous): w1 [Hq, D, M], b1 [Hq, M], w2 [Hq, M, D], b2 [Hq, D],
//                                  g1 [Hq, D, R], c1 [Hq, R], g2 [Hq, R]
//   cos, sin: [B, Nq, D] float32 (batch stride may be 0)
// Packed variable-length sequences (cu_seqlens_q/k set, FlashAttention's varlen layout):
//   q, out, attn, dout: [total_q, Hq, D]   k, v: [total_k, Hkv, D]   cos, sin: [total_q, D]
//   gate, dgate: [total_q, Hq]             lse: [Hq, total_q]
// Memory slots (memory_index set): every weight and weight gradient has a leading dim K.
// Python allocates every buffer; the kernels only read and write through these pointers.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define LIFT_HD __host__ __device__ __forceinline__
#else
#define LIFT_HD inline
#endif

namespace lift {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Element strides of a [B, N, H, D] tensor whose last dim is contiguous.
struct Strides {
  int64_t batch = 0, row = 0, head = 0;
};

struct AttnParams {
  int64_t batch = 0, nq = 0, nk = 0, hq = 0, hkv = 0;
  int64_t head_dim = 0, mem_hidden = 0, gate_hidden = 0;
  DType dtype = DType::kFloat32;  // of q, k, v, out, attn, dout, dq, dk, dv

  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  Strides q_stride, k_stride, v_stride;

  // Weights in float32, contiguous; the biases may be null (absent).
  const float *w1 = nullptr, *b1 = nullptr, *w2 = nullptr, *b2 = nullptr;
  const float *g1 = nullptr, *c1 = nullptr, *g2 = nullptr;

  // The CUDA forward's tensor-core operands, in dtype, contiguous (cext.py makes them from
  // the float32 weights): w1t_mma [Hq, M, D] = W1^T, w2_mma [Hq, M, D] = W2, g1t_mma
  // [Hq, 16, D] = G1^T with rows >= R zero.  Unused by the CPU kernels.
  const void *w1t_mma = nullptr, *w2_mma = nullptr, *g1t_mma = nullptr;

  const float* cos = nullptr;  // null: no rotation
  const float* sin = nullptr;
  int64_t rope_batch_stride = 0, rope_row_stride = 0;

  // Forward outputs, backward inputs.  out and attn contiguous [B, Nq, Hq, D].
  void* out = nullptr;
  void* attn = nullptr;
  float* gate = nullptr;
  float* lse = nullptr;

  // Backward.  dgate may be null (no upstream gradient for the gate).
  const void* dout = nullptr;
  Strides dout_stride;
  const float* dgate = nullptr;
  void* dq = nullptr;  // contiguous [B, Nq, Hq, D] in dtype
  void* dk = nullptr;  // contiguous [B, Nk, Hkv, D] in dtype
  void* dv = nullptr;
  // Weight gradients in float32, the weights' shapes; db1/db2/dc1 null when the bias is absent.
  float *dw1 = nullptr, *db1 = nullptr, *dw2 = nullptr, *db2 = nullptr;
  float *dg1 = nullptr, *dc1 = nullptr, *dg2 = nullptr;

  // Backward scratch on the device (CUDA only; cuda::backward_workspace_bytes says how much).
  void* workspace = nullptr;

  float scale = 1.f;  // softmax scale
  float gate_scale = 3.f, gate_shift = 1.f;
  bool causal = true;
  // Sliding window around the bottom-right diagonal d(i) = i + nk - nq: query i sees key j
  // iff d(i) - window_left <= j <= d(i) + window_right, -1 being unbounded (FlashAttention's
  // convention); causal bounds the right side at 0 by itself.
  int64_t window_left = -1, window_right = -1;
  float softcap = 0.f;  // > 0: scaled scores s -> softcap * tanh(s / softcap)
  int64_t stream = 0;  // cudaStream_t as an integer (CUDA only)

  // Packed variable-length sequences (issue 15), or null for the [B, N, H, D] layout.  When
  // set, `batch` is the number of sequences S, nq/nk bound every sequence's length
  // (max_seqlen_q/k), sequence s is rows [cu_seqlens_q[s], cu_seqlens_q[s+1]) of q and
  // [cu_seqlens_k[s], cu_seqlens_k[s+1]) of k/v, causal and window bottom-right within it;
  // the batch strides are unused.  Read on the host (CPU kernels).
  const int32_t* cu_seqlens_q = nullptr;  // [S + 1]
  const int32_t* cu_seqlens_k = nullptr;
  int64_t total_q = 0, total_k = 0;
  // Memory slots (issue 15), or null for one memory: sequence s reads and trains slot
  // memory_index[s] of weights [num_slots, Hq, ...].
  const int64_t* memory_index = nullptr;  // [S]
  int64_t num_slots = 1;
};

// Where one sequence (a batch element, or a packed sequence) lives.  Rows of the flattened
// contiguous tensors (out, attn, gate, dq: [rows, Hq, ...]; dk, dv: [rows, Hkv, D]) are
// q_row + i and k_row + j; strided inputs start at the element offsets q_off, k_off, v_off,
// dout_off (head 0, row 0) and cos/sin at rope_off; lse of head h, row i at
// lse_off + h * lse_head_stride + i.
struct Sequence {
  int64_t nq = 0, nk = 0;
  int64_t q_row = 0, k_row = 0;
  int64_t q_off = 0, k_off = 0, v_off = 0, dout_off = 0, rope_off = 0;
  int64_t lse_off = 0, lse_head_stride = 0;
  int64_t slot = 0;
};

LIFT_HD Sequence sequence(const AttnParams& p, int64_t s) {
  Sequence seq;
  if (p.cu_seqlens_q) {
    seq.q_row = p.cu_seqlens_q[s];
    seq.k_row = p.cu_seqlens_k[s];
    seq.nq = p.cu_seqlens_q[s + 1] - seq.q_row;
    seq.nk = p.cu_seqlens_k[s + 1] - seq.k_row;
    seq.q_off = seq.q_row * p.q_stride.row;
    seq.k_off = seq.k_row * p.k_stride.row;
    seq.v_off = seq.k_row * p.v_stride.row;
    seq.dout_off = seq.q_row * p.dout_stride.row;
    seq.rope_off = seq.q_row * p.rope_row_stride;
    seq.lse_off = seq.q_row;
    seq.lse_head_stride = p.total_q;
  } else {
    seq.nq = p.nq;
    seq.nk = p.nk;
    seq.q_row = s * p.nq;
    seq.k_row = s * p.nk;
    seq.q_off = s * p.q_stride.batch;
    seq.k_off = s * p.k_stride.batch;
    seq.v_off = s * p.v_stride.batch;
    seq.dout_off = s * p.dout_stride.batch;
    seq.rope_off = s * p.rope_batch_stride;
    seq.lse_off = s * p.hq * p.nq;
    seq.lse_head_stride = p.nq;
  }
  seq.slot = p.memory_index ? p.memory_index[s] : 0;
  return seq;
}

// ---- shared per-element math ------------------------------------------------------------

LIFT_HD float lift_exp(float x) {
#if defined(__CUDA_ARCH__)
  return __expf(x);
#else
  return std::exp(x);
#endif
}

LIFT_HD float sigmoid(float x) { return 1.f / (1.f + lift_exp(-x)); }

LIFT_HD float silu(float x) { return x * sigmoid(x); }

// d silu(x) / dx = s (1 + x (1 - s)), s = sigmoid(x)
LIFT_HD float silu_grad(float x) {
  const float s = sigmoid(x);
  return s * (1.f + x * (1.f - s));
}

// gate = sigmoid(gate_scale * (logit - gate_shift))
LIFT_HD float gate_from_logit(float logit, float gate_scale, float gate_shift) {
  return sigmoid(gate_scale * (logit - gate_shift));
}

// d gate / d logit, from the gate itself
LIFT_HD float gate_logit_grad(float gate, float gate_scale) {
  return gate_scale * gate * (1.f - gate);
}

// HF's rotate_half RoPE, element e of the rotated row: x[e] cos[e] + rot(x)[e] sin[e] with
// rot(x) = cat(-x[D/2:], x[:D/2]).
LIFT_HD float rope_element(const float* x, const float* cos, const float* sin, int e, int half) {
  const float rot = e < half ? -x[e + half] : x[e - half];
  return x[e] * cos[e] + rot * sin[e];
}

// The transpose of rope_element: element e of d(unrotated) from d(rotated) dy.
LIFT_HD float rope_element_grad(const float* dy, const float* cos, const float* sin, int e,
                                int half) {
  const float rot = e < half ? dy[e + half] * sin[e + half] : -dy[e - half] * sin[e - half];
  return dy[e] * cos[e] + rot;
}

// Online softmax: the factor that rescales a row's running sum and accumulator when its
// running max moves from m_old to m_new (>= m_old).  A row that has seen no key yet
// (m_old = -inf) has nothing to rescale.
LIFT_HD float softmax_rescale(float m_old, float m_new) {
  return m_old == -INFINITY ? 0.f : lift_exp(m_old - m_new);
}

// The max to subtract before exponentiating: 0 for a row with no visible key so far, which
// keeps exp(-inf - max) = 0 instead of NaN.
LIFT_HD float softmax_safe_max(float m) { return m == -INFINITY ? 0.f : m; }

// Log-sum-exp of a finished row; -inf for a row that saw no key.
LIFT_HD float softmax_lse(float m, float l) {
  return l > 0.f ? m + std::log(l) : -INFINITY;
}

// Bottom-right causal mask: query i sees key j iff j <= i + nk - nq.
LIFT_HD bool causal_visible(int64_t i, int64_t j, int64_t nq, int64_t nk) {
  return j <= i + nk - nq;
}

// Whether query i sees key j: causal and the sliding window, bottom-right aligned.
LIFT_HD bool key_visible(int64_t i, int64_t j, int64_t nq, int64_t nk, bool causal,
                         int64_t window_left, int64_t window_right) {
  const int64_t offset = j - (i + nk - nq);
  return (!causal || offset <= 0) && (window_left < 0 || offset >= -window_left) &&
         (window_right < 0 || offset <= window_right);
}

// out = (1 - g) attn + g mem
LIFT_HD float gated_mix(float attn, float mem, float g) { return attn + g * (mem - attn); }

}  // namespace lift
