"""Hand-written C for the int8 convolution on Cortex-M cores with SIMD: the M-profile DSP
extension's SMLAD (two 16-bit multiply-accumulates per instruction) or Helium's VMLADAVA (sixteen
8-bit ones).

TVM's C code generator writes pockengine.quantized_conv2d as a scalar loop nest that checks the
padding at every tap; the frozen int8 prefix of a training step is mostly these convolutions. When
the preset's `features` name "mve" or "dsp", every kernel that is exactly one such convolution (its
legalized PrimFunc, marked with quantized_ops.CONV2D_KERNEL_ATTR, unfused) becomes a call of the
C below with the convolution's configuration, under the kernel's own name and pointer ABI: the
driver calls it as it would TVM's. Anything else (fused with another operator, a trained float
weight or a split one, a core without the features) keeps TVM's generated loops.

The arithmetic is the operator's (frontend/quantized_ops.py), to the bit: int32 accumulation
(wrapping as TVM's does), the bias rounded half away from zero from its float value, then
(acc + bias) * m + 2^(n-1) >> n in int64, the output zero point, the clip. The window of each
output pixel is gathered once into a column (im2col) and reused by every output channel of the
group:
  DSP  the column holds x - zero_x as int16 (0 in the padding), 4 taps at a time reordered as
       (t0, t2), (t1, t3), the order in which SXTB16 widens a word of 4 int8 weights into two pairs;
  MVE  the column holds x as it is (zero_x in the padding) and the channel's sum(w) * zero_x is
       subtracted once: sum((x - zero_x) w) = sum(x w) - zero_x sum(w), equal modulo 2^32.
The scratch (rounded biases, weight offsets, the column) comes from the kernels' static workspace.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import TargetError
from ...frontend import quantized_ops
from .kernels import c_symbol

# The instruction sets this file has kernels for, best first (a preset's `features` choose one).
MVE, DSP = "mve", "dsp"
SIMD_FEATURES = (MVE, DSP)
# The dtypes of the kernel's parameters the C handles: int8 x, int8 weight (frozen, unsplit), the
# float bias a trained or frozen bias is held in, int32 multiplier and shift, int8 output.
SUPPORTED_DTYPES = ("int8", "int8", "float32", "int32", "int32", "int8")
PARAMETERS = "int8_t* x, int8_t* weight, float* bias, int32_t* multiplier, int32_t* shift, int8_t* y"


def simd_of(preset) -> str | None:
    """The SIMD instruction set the hand-written kernels use on `preset`, None for none."""
    features = getattr(preset, "features", frozenset())
    return next((f for f in SIMD_FEATURES if f in features), None)


@dataclass(frozen=True)
class Convolution:
    """The geometry and integer configuration of one quantized_conv2d kernel."""
    batch: int
    in_channels: int
    in_h: int
    in_w: int
    out_channels: int
    out_h: int
    out_w: int
    kernel_h: int
    kernel_w: int
    config: tuple  # quantized_ops' 13 integers

    @property
    def window(self) -> int:
        """Taps of one output value: the column's length."""
        groups = self.config[12]
        return self.in_channels // groups * self.kernel_h * self.kernel_w

    def scratch_bytes(self, simd: str) -> int:
        """Rounded biases (+ weight offsets under MVE) as int32, then the column: int16 padded to a
        multiple of 4 taps (DSP), int8 padded to a vector of 16 (MVE)."""
        if simd == MVE:
            return 8 * self.out_channels + -(-self.window // 16) * 16
        return 4 * self.out_channels + 2 * (-(-self.window // 4) * 4)

    def c_initializer(self) -> str:
        zero_x, zero_y, qmin, qmax, stride_h, stride_w, top, left, _, _, dil_h, dil_w, groups = self.config
        fields = (self.batch, self.in_channels, self.in_h, self.in_w, self.out_channels, self.out_h, self.out_w,
                  self.kernel_h, self.kernel_w, stride_h, stride_w, top, left, dil_h, dil_w, groups,
                  zero_x, zero_y, qmin, qmax)
        return "{" + ", ".join(str(int(v)) for v in fields) + "}"


def convolution_of(func) -> Convolution | None:
    """The convolution `func` computes when it is exactly one quantized_conv2d that the C handles
    (see SUPPORTED_DTYPES), else None. TargetError when a marked kernel's shapes contradict its
    configuration (a pass changed the function but kept the mark)."""
    attrs = func.attrs
    if attrs is None or quantized_ops.CONV2D_KERNEL_ATTR not in attrs:
        return None
    config = tuple(int(v) for v in attrs[quantized_ops.CONV2D_KERNEL_ATTR])
    types = [p.ty for p in func.params]
    if len(types) != len(SUPPORTED_DTYPES) or tuple(str(t.dtype) for t in types) != SUPPORTED_DTYPES:
        return None  # a split or float (trained) weight, or another dtype: TVM's loops
    if not -128 <= config[quantized_ops.CONV_ZERO_X] <= 127:
        return None  # the MVE column pads with zero_x as an int8
    shapes = [[int(d) for d in t.shape] for t in types]
    x, w, bias, multiplier, shift, y = shapes
    conv = Convolution(*x, w[0], *y[2:], *w[2:], config)
    attrs = quantized_ops.conv_attrs(list(config))
    expected_y = [x[0], w[0], *quantized_ops.conv_output_size(x[2:], w[2:], attrs)]
    groups = attrs["groups"]
    if (len(x) != 4 or y != expected_y or w[1] * groups != x[1] or w[0] % groups or bias != [w[0]]
            or multiplier != [w[0]] or shift != [w[0]]):
        raise TargetError(f"a kernel marked as a quantized_conv2d has shapes x {x}, weight {w}, output {y} that its "
                          f"configuration {list(config)} does not give")
    return conv


def handwritten(kernels: dict, preset) -> dict:
    """{kernel name: Convolution} of the kernels among `kernels` ({name: PrimFunc}) that the
    hand-written C replaces on `preset` (none without a SIMD feature)."""
    if simd_of(preset) is None:
        return {}
    found = {name: convolution_of(func) for name, func in kernels.items()}
    return {name: conv for name, conv in found.items() if conv is not None}


def c_source(convolutions: dict, simd: str) -> str:
    """The C library and one function per kernel, `void pe_k_<name>(...)` with the pointer ABI
    the driver calls TVM's kernel with, passing the convolution's configuration and its scratch."""
    if simd not in SIMD_FEATURES:
        raise TargetError(f"no hand-written int8 convolution for {simd!r}; there are: {', '.join(SIMD_FEATURES)}")
    parts = [f"\n/* ---- PockEngine's hand-written int8 convolutions ({simd.upper()}), int8_conv.py ---- */",
             f"#define PE_INT8_{simd.upper()} 1", LIBRARY_C]
    parts += [f"TVM_DLL void {c_symbol(name)}({PARAMETERS});" for name in convolutions]
    for name, conv in convolutions.items():
        scratch = conv.scratch_bytes(simd)
        parts.append(
            f"void {c_symbol(name)}({PARAMETERS}) {{\n"
            f"  static const pe_conv_s8_config config = {conv.c_initializer()};\n"
            # this exact form: kernels.workspace_bytes reads the sizes from the calls
            f"  void* scratch = TVMBackendAllocWorkspace(1, 0, (uint64_t){scratch}, 0, 8);\n"
            f"  pe_conv_s8(&config, x, weight, bias, multiplier, shift, y, scratch);\n"
            f"  TVMBackendFreeWorkspace(1, 0, scratch);\n}}")
    return "\n".join(parts) + "\n"


LIBRARY_C = r"""
#include <stdint.h>
#include <string.h>
#include <math.h>
#if defined(PE_INT8_MVE)
#if !defined(__ARM_FEATURE_MVE)
#error "PE_INT8_MVE: this core's flags enable no Helium (MVE); build for a Cortex-M55/M85 (-mcpu=cortex-m55)"
#endif
#include <arm_mve.h>
#elif defined(PE_INT8_DSP)
#if !defined(__ARM_FEATURE_DSP)
#error "PE_INT8_DSP: this core's flags enable no DSP extension; build for a Cortex-M4/M7/M33 (-mcpu=...)"
#endif
#include <arm_acle.h>
#else
#error "define PE_INT8_MVE or PE_INT8_DSP"
#endif

typedef struct {
  int32_t batch, in_channels, in_h, in_w, out_channels, out_h, out_w, kernel_h, kernel_w;
  int32_t stride_h, stride_w, pad_top, pad_left, dilation_h, dilation_w, groups;
  int32_t zero_x, zero_y, qmin, qmax;
} pe_conv_s8_config;

/* The bias as the TIR kernel rounds it: trunc(v), +1 or -1 when the fraction is a half or more
 * (quantized_ops.round_half_away), in float32 as there. */
static int32_t pe_round_half_away(float v) {
  float whole = truncf(v), fraction = v - whole;
  return (int32_t)(whole + (fraction >= 0.5f ? 1.0f : 0.0f) + (fraction <= -0.5f ? -1.0f : 0.0f));
}

/* CMSIS-NN's single rounding, in int64 as quantized_ops.requantize; then the zero point and the clip. */
static inline int8_t pe_requantize(int32_t acc, int32_t bias, int32_t multiplier, int32_t shift,
                                   const pe_conv_s8_config* c) {
  int64_t scaled = ((int64_t)acc + (int64_t)bias) * (int64_t)multiplier + ((int64_t)1 << (shift - 1));
  int64_t y = (scaled >> shift) + c->zero_y;
  if (y > c->qmax) y = c->qmax;
  if (y < c->qmin) y = c->qmin;
  return (int8_t)y;
}

#if defined(PE_INT8_MVE)
typedef int8_t pe_tap_t;
#define PE_TAP(v) (v)
#else
typedef int16_t pe_tap_t;
#define PE_TAP(v) ((int16_t)((v) - zero_x))
#endif

/* The window of output pixel (oh, ow) from the group's first input channel x_group, in the
 * weight's (channel, ky, kx) order; padding reads as x == zero_x. A window wholly inside the image
 * (most of them) is copied without checks. */
static void pe_column(const pe_conv_s8_config* c, const int8_t* x_group, int oh, int ow, pe_tap_t* column) {
  const int channels = c->in_channels / c->groups, plane = c->in_h * c->in_w;
  const int kh = c->kernel_h, kw = c->kernel_w, dh = c->dilation_h, dw = c->dilation_w;
  const int row0 = oh * c->stride_h - c->pad_top, col0 = ow * c->stride_w - c->pad_left;
  const int32_t zero_x = c->zero_x;
#if defined(PE_INT8_MVE)
  const pe_tap_t padding = (int8_t)zero_x;
#else
  const pe_tap_t padding = 0;
#endif
  const int inside = row0 >= 0 && col0 >= 0 && row0 + (kh - 1) * dh < c->in_h && col0 + (kw - 1) * dw < c->in_w;
  pe_tap_t* out = column;
  for (int ch = 0; ch < channels; ++ch) {
    const int8_t* x_channel = x_group + ch * plane;
    for (int ky = 0; ky < kh; ++ky) {
      const int row = row0 + ky * dh;
      const int8_t* x_row = x_channel + row * c->in_w;
      if (inside) {
        for (int kx = 0; kx < kw; ++kx) *out++ = PE_TAP(x_row[col0 + kx * dw]);
      } else if (row < 0 || row >= c->in_h) {
        for (int kx = 0; kx < kw; ++kx) *out++ = padding;
      } else {
        for (int kx = 0; kx < kw; ++kx) {
          const int col = col0 + kx * dw;
          *out++ = col >= 0 && col < c->in_w ? PE_TAP(x_row[col]) : padding;
        }
      }
    }
  }
}

#if defined(PE_INT8_DSP)
static inline int32_t pe_load32(const void* p) {  /* unaligned: a weight row starts anywhere */
  int32_t v;
  memcpy(&v, p, 4);
  return v;
}

/* Bytes 1 and 3 of a word where SXTB16 reads (GCC's arm_acle.h has no __ror; it folds this
 * rotation into SXTB16's own). */
static inline int8x4_t pe_ror8(int8x4_t v) {
  return (int8x4_t)(((uint32_t)v >> 8) | ((uint32_t)v << 24));
}

/* Taps (t0, t1, t2, t3) of each whole group of 4 to (t0, t2, t1, t3): SXTB16 widens bytes 0 and 2
 * of a word of weights, SXTB16 of it rotated by 8 bytes 1 and 3. */
static void pe_reorder_for_sxtb16(pe_tap_t* column, int taps) {
  for (int k = 0; k + 4 <= taps; k += 4) {
    uint32_t low = (uint32_t)pe_load32(column + k), high = (uint32_t)pe_load32(column + k + 2);
    uint32_t even = (low & 0xFFFFu) | (high << 16), odd = (low >> 16) | (high & 0xFFFF0000u);
    memcpy(column + k, &even, 4);
    memcpy(column + k + 2, &odd, 4);
  }
}

/* The dot products of two weight rows with the column: 2 SMLAD per 4 taps and row. */
static inline void pe_dot2(const int8_t* w0, const int8_t* w1, const pe_tap_t* column, int taps,
                           int32_t* sum0, int32_t* sum1) {
  int32_t a0 = 0, a1 = 0;
  int k = 0;
  for (; k + 4 <= taps; k += 4) {
    const int16x2_t even = pe_load32(column + k), odd = pe_load32(column + k + 2);
    const int8x4_t v0 = pe_load32(w0 + k), v1 = pe_load32(w1 + k);
    a0 = __smlad(__sxtb16(v0), even, a0);
    a0 = __smlad(__sxtb16(pe_ror8(v0)), odd, a0);
    a1 = __smlad(__sxtb16(v1), even, a1);
    a1 = __smlad(__sxtb16(pe_ror8(v1)), odd, a1);
  }
  for (; k < taps; ++k) {  /* the last taps % 4, in their own order */
    a0 += w0[k] * column[k];
    a1 += w1[k] * column[k];
  }
  *sum0 = a0;
  *sum1 = a1;
}

static inline int32_t pe_dot1(const int8_t* w0, const pe_tap_t* column, int taps) {
  int32_t a0 = 0;
  int k = 0;
  for (; k + 4 <= taps; k += 4) {
    const int8x4_t v0 = pe_load32(w0 + k);
    a0 = __smlad(__sxtb16(v0), pe_load32(column + k), a0);
    a0 = __smlad(__sxtb16(pe_ror8(v0)), pe_load32(column + k + 2), a0);
  }
  for (; k < taps; ++k) a0 += w0[k] * column[k];
  return a0;
}
#endif

#if defined(PE_INT8_MVE)
/* The dot products of four weight rows with the column, 16 taps per VMLADAVA, the last vector
 * predicated (its lanes past the window load as 0). */
static inline void pe_dot4(const int8_t* w, int taps, const pe_tap_t* column, int32_t* sums) {
  int32_t a0 = 0, a1 = 0, a2 = 0, a3 = 0;
  for (int k = 0; k < taps; k += 16) {
    const mve_pred16_t p = vctp8q((uint32_t)(taps - k));
    const int8x16_t col = vldrbq_z_s8(column + k, p);
    a0 = vmladavaq_s8(a0, vldrbq_z_s8(w + k, p), col);
    a1 = vmladavaq_s8(a1, vldrbq_z_s8(w + taps + k, p), col);
    a2 = vmladavaq_s8(a2, vldrbq_z_s8(w + 2 * taps + k, p), col);
    a3 = vmladavaq_s8(a3, vldrbq_z_s8(w + 3 * taps + k, p), col);
  }
  sums[0] = a0;
  sums[1] = a1;
  sums[2] = a2;
  sums[3] = a3;
}

static inline int32_t pe_dot1(const int8_t* w, int taps, const pe_tap_t* column) {
  int32_t a0 = 0;
  for (int k = 0; k < taps; k += 16) {
    const mve_pred16_t p = vctp8q((uint32_t)(taps - k));
    a0 = vmladavaq_s8(a0, vldrbq_z_s8(w + k, p), vldrbq_z_s8(column + k, p));
  }
  return a0;
}
#endif

/* A depthwise convolution (one input and one output channel a group) plane by plane, without a
 * column: a window's column would cost as much as its one dot product. Where the window is wholly
 * inside the image, sum(x w) - zero_x sum(w) (equal modulo 2^32); at the borders, the taps inside.
 * NCHW keeps a channel's taps apart, so this is scalar (MLA) on either core; a 3x3 window is
 * unrolled with its weights in registers. */
static void pe_depthwise_s8(const pe_conv_s8_config* c, const int8_t* x, const int8_t* w, const int32_t* rounded_bias,
                            const int32_t* multiplier, const int32_t* shift, int8_t* y) {
  const int kh = c->kernel_h, kw = c->kernel_w, dh = c->dilation_h, dw = c->dilation_w;
  const int in_h = c->in_h, in_w = c->in_w, taps = kh * kw;
  const int32_t zero_x = c->zero_x;
  for (int b = 0; b < c->batch; ++b) {
    for (int ch = 0; ch < c->out_channels; ++ch) {
      const int8_t* plane = x + (b * c->in_channels + ch) * in_h * in_w;
      const int8_t* wc = w + ch * taps;
      int8_t* y_plane = y + (b * c->out_channels + ch) * c->out_h * c->out_w;
      int32_t weight_sum = 0;
      for (int k = 0; k < taps; ++k) weight_sum += wc[k];
      const int32_t offset = zero_x * weight_sum;
      const int w0 = wc[0], w1 = taps == 9 ? wc[1] : 0, w2 = taps == 9 ? wc[2] : 0, w3 = taps == 9 ? wc[3] : 0,
                w4 = taps == 9 ? wc[4] : 0, w5 = taps == 9 ? wc[5] : 0, w6 = taps == 9 ? wc[6] : 0,
                w7 = taps == 9 ? wc[7] : 0, w8 = taps == 9 ? wc[8] : 0;
      for (int oh = 0; oh < c->out_h; ++oh) {
        const int row0 = oh * c->stride_h - c->pad_top;
        const int rows_inside = row0 >= 0 && row0 + (kh - 1) * dh < in_h;
        for (int ow = 0; ow < c->out_w; ++ow) {
          const int col0 = ow * c->stride_w - c->pad_left;
          int32_t acc = 0;
          if (rows_inside && col0 >= 0 && col0 + (kw - 1) * dw < in_w) {
            const int8_t* r0 = plane + row0 * in_w + col0;
            if (kh == 3 && kw == 3) {
              const int8_t *r1 = r0 + dh * in_w, *r2 = r1 + dh * in_w;
              acc = r0[0] * w0 + r0[dw] * w1 + r0[2 * dw] * w2 + r1[0] * w3 + r1[dw] * w4 + r1[2 * dw] * w5
                    + r2[0] * w6 + r2[dw] * w7 + r2[2 * dw] * w8;
            } else {
              for (int ky = 0; ky < kh; ++ky)
                for (int kx = 0; kx < kw; ++kx) acc += r0[ky * dh * in_w + kx * dw] * wc[ky * kw + kx];
            }
            acc -= offset;
          } else {
            for (int ky = 0; ky < kh; ++ky) {
              const int row = row0 + ky * dh;
              if (row < 0 || row >= in_h) continue;
              for (int kx = 0; kx < kw; ++kx) {
                const int col = col0 + kx * dw;
                if (col >= 0 && col < in_w) acc += (plane[row * in_w + col] - zero_x) * wc[ky * kw + kx];
              }
            }
          }
          y_plane[oh * c->out_w + ow] = pe_requantize(acc, rounded_bias[ch], multiplier[ch], shift[ch], c);
        }
      }
    }
  }
}

/* y = quantized_conv2d(x, w, bias, multiplier, shift) on NCHW int8 x and y and OIHW int8 w. */
static void pe_conv_s8(const pe_conv_s8_config* c, const int8_t* x, const int8_t* w, const float* bias,
                       const int32_t* multiplier, const int32_t* shift, int8_t* y, void* scratch) {
  const int out_channels = c->out_channels, groups = c->groups;
  const int in_per_group = c->in_channels / groups, out_per_group = out_channels / groups;
  const int taps = in_per_group * c->kernel_h * c->kernel_w;
  const int in_plane = c->in_h * c->in_w, out_plane = c->out_h * c->out_w;
  int32_t* rounded_bias = (int32_t*)scratch;
  for (int o = 0; o < out_channels; ++o) rounded_bias[o] = pe_round_half_away(bias[o]);
  if (in_per_group == 1 && out_per_group == 1) {
    pe_depthwise_s8(c, x, w, rounded_bias, multiplier, shift, y);
    return;
  }
#if defined(PE_INT8_MVE)
  int32_t* weight_offset = rounded_bias + out_channels;  /* zero_x * sum(w[o]), modulo 2^32 */
  pe_tap_t* column = (pe_tap_t*)(weight_offset + out_channels);
  for (int o = 0; o < out_channels; ++o) {
    uint32_t sum = 0;
    for (int k = 0; k < taps; ++k) sum += (uint32_t)(int32_t)w[o * taps + k];
    weight_offset[o] = (int32_t)(sum * (uint32_t)c->zero_x);
  }
#else
  pe_tap_t* column = (pe_tap_t*)(rounded_bias + out_channels);
#endif
  for (int b = 0; b < c->batch; ++b) {
    for (int g = 0; g < groups; ++g) {
      const int8_t* x_group = x + (b * c->in_channels + g * in_per_group) * in_plane;
      for (int oh = 0; oh < c->out_h; ++oh) {
        for (int ow = 0; ow < c->out_w; ++ow) {
          pe_column(c, x_group, oh, ow, column);
          int8_t* y_pixel = y + b * out_channels * out_plane + oh * c->out_w + ow;
          int o = g * out_per_group;
          const int end = o + out_per_group;
#if defined(PE_INT8_DSP)
          pe_reorder_for_sxtb16(column, taps);
          for (; o + 2 <= end; o += 2) {
            int32_t s0, s1;
            pe_dot2(w + o * taps, w + (o + 1) * taps, column, taps, &s0, &s1);
            y_pixel[o * out_plane] = pe_requantize(s0, rounded_bias[o], multiplier[o], shift[o], c);
            y_pixel[(o + 1) * out_plane] = pe_requantize(s1, rounded_bias[o + 1], multiplier[o + 1], shift[o + 1], c);
          }
          for (; o < end; ++o)
            y_pixel[o * out_plane] = pe_requantize(pe_dot1(w + o * taps, column, taps), rounded_bias[o],
                                                   multiplier[o], shift[o], c);
#else
          for (; o + 4 <= end; o += 4) {
            int32_t sums[4];
            pe_dot4(w + o * taps, taps, column, sums);
            for (int i = 0; i < 4; ++i)
              y_pixel[(o + i) * out_plane] = pe_requantize(
                  (int32_t)((uint32_t)sums[i] - (uint32_t)weight_offset[o + i]), rounded_bias[o + i],
                  multiplier[o + i], shift[o + i], c);
          }
          for (; o < end; ++o) {
            const int32_t sum = pe_dot1(w + o * taps, taps, column);
            y_pixel[o * out_plane] = pe_requantize((int32_t)((uint32_t)sum - (uint32_t)weight_offset[o]),
                                                   rounded_bias[o], multiplier[o], shift[o], c);
          }
#endif
        }
      }
    }
  }
}
"""
