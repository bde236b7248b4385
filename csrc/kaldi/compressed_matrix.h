// Kaldi's CompressedMatrix, decoding side (src/matrix/compressed-matrix.cc).
//
// In memory (and on disk after the token "CM", "CM2" or "CM3", which replaces the
// format field) a compressed matrix is a 20-byte GlobalHeader followed by a payload:
//
//   int32 format, float min_value, float range, int32 num_rows (R), int32 num_cols (C)
//
// With u16(q) = min_value + (range * (1/65535 as float)) * q, all in float:
//
//   format 1, kOneByteWithColHeaders: C x {uint16 q0, q25, q75, q100}, then the bytes
//     b[c][r] column-major; with p_i = u16(q_i), value(b) =
//        b <= 64  : p0  + (p25 - p0)  * b        * (1/64.0)
//        b <= 192 : p25 + (p75 - p25) * (b - 64)  * (1/128.0)
//        else     : p75 + (p100 - p75)* (b - 192) * (1/63.0)
//     where the product "(p_hi - p_lo) * k" is float and the rest is done in double,
//     then rounded to float (C++ promotion rules of Kaldi's CharToFloat).
//   format 2, kTwoByte: uint16 q[r][c] row-major, value = min + q * inc,
//     inc = float(range * (1.0 / 65535.0)), product and sum in float.
//   format 3, kOneByte: uint8 q[r][c], value = min + q * float(range * (1.0 / 255.0)).
//
// DecompressMatrix reproduces Kaldi's CopyToMat bit for bit: it is compiled without
// floating-point contraction (an FMA would round once instead of twice).
#ifndef PKWRAP_CSRC_KALDI_COMPRESSED_MATRIX_H_
#define PKWRAP_CSRC_KALDI_COMPRESSED_MATRIX_H_

#include <cstddef>
#include <cstdint>

namespace pkwrap {
namespace kaldi {

struct CompressedMatrixHeader {
  int32_t format;   // 1, 2 or 3 (see above)
  float min_value;  // global minimum
  float range;      // global max - min
  int32_t num_rows;
  int32_t num_cols;
};

// Bytes of payload after the 20-byte header; throws std::invalid_argument on a bad
// format or negative sizes.
int64_t CompressedPayloadSize(const CompressedMatrixHeader &h);

// Decodes header + payload (`size` bytes at `data`, header first) into `out`, a
// row-major float32 buffer of num_rows * num_cols. Throws std::invalid_argument when
// `size` does not match the header.
void DecompressMatrix(const uint8_t *data, size_t size, float *out);

}  // namespace kaldi
}  // namespace pkwrap

#endif  // PKWRAP_CSRC_KALDI_COMPRESSED_MATRIX_H_
