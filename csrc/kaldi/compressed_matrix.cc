// Decoding of Kaldi's CompressedMatrix; see compressed_matrix.h for the format.
//
// Exactness: Kaldi's CopyToMat evaluates `min + q * inc` in float and the one-byte
// column formula partly in double. A fused multiply-add would change the last bit, so
// contraction is switched off for this file whatever -march the build uses.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include "kaldi/compressed_matrix.h"

#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

namespace pkwrap {
namespace kaldi {

int64_t CompressedPayloadSize(const CompressedMatrixHeader &h) {
  if (h.num_rows < 0 || h.num_cols < 0)
    throw std::invalid_argument("compressed matrix: negative size " +
                                std::to_string(h.num_rows) + " x " +
                                std::to_string(h.num_cols));
  const int64_t r = h.num_rows, c = h.num_cols;
  switch (h.format) {
    case 1: return c * (8 + r);
    case 2: return 2 * r * c;
    case 3: return r * c;
    default:
      throw std::invalid_argument("compressed matrix: unknown format " +
                                  std::to_string(h.format));
  }
}

namespace {

// Kaldi's Uint16ToFloat: min + (range * 1/65535f) * q, in float.
inline float Uint16ToFloat(const CompressedMatrixHeader &h, uint16_t q) {
  const float scale = h.range * 1.52590218966964e-05F;
  const float prod = scale * static_cast<float>(q);
  return h.min_value + prod;
}

// Per-column table of the 256 byte values (Kaldi's CharToFloat).
void ColumnTable(float p0, float p25, float p75, float p100, float *table) {
  for (int v = 0; v < 256; v++) {
    double r;
    if (v <= 64) {
      const float m = (p25 - p0) * static_cast<float>(v);
      r = static_cast<double>(p0) + static_cast<double>(m) * (1 / 64.0);
    } else if (v <= 192) {
      const float m = (p75 - p25) * static_cast<float>(v - 64);
      r = static_cast<double>(p25) + static_cast<double>(m) * (1 / 128.0);
    } else {
      const float m = (p100 - p75) * static_cast<float>(v - 192);
      r = static_cast<double>(p75) + static_cast<double>(m) * (1 / 63.0);
    }
    table[v] = static_cast<float>(r);
  }
}

}  // namespace

void DecompressMatrix(const uint8_t *data, size_t size, float *out) {
  CompressedMatrixHeader h;
  if (size < sizeof(h))
    throw std::invalid_argument("compressed matrix: fewer than 20 header bytes");
  std::memcpy(&h, data, sizeof(h));
  const int64_t payload = CompressedPayloadSize(h);
  if (static_cast<int64_t>(size) != static_cast<int64_t>(sizeof(h)) + payload)
    throw std::invalid_argument("compressed matrix: " + std::to_string(size) +
                                " bytes, header wants " +
                                std::to_string(sizeof(h) + payload));
  const int64_t R = h.num_rows, C = h.num_cols;
  const uint8_t *p = data + sizeof(h);
  if (h.format == 1) {
    const uint8_t *bytes = p + 8 * C;
    std::vector<float> tables(static_cast<size_t>(C) * 256);
    for (int64_t c = 0; c < C; c++) {
      uint16_t q[4];
      std::memcpy(q, p + 8 * c, 8);
      ColumnTable(Uint16ToFloat(h, q[0]), Uint16ToFloat(h, q[1]),
                  Uint16ToFloat(h, q[2]), Uint16ToFloat(h, q[3]), &tables[c * 256]);
    }
    // The bytes are column-major, the output row-major: go through blocks of rows so
    // that both the reads of every column and the writes of every row stay in cache.
    const int64_t kBlock = 32;
    for (int64_t r0 = 0; r0 < R; r0 += kBlock) {
      const int64_t r1 = r0 + kBlock < R ? r0 + kBlock : R;
      for (int64_t c = 0; c < C; c++) {
        const float *table = &tables[c * 256];
        const uint8_t *col = bytes + c * R;
        for (int64_t r = r0; r < r1; r++) out[r * C + c] = table[col[r]];
      }
    }
  } else if (h.format == 2) {
    const float inc = static_cast<float>(h.range * (1.0 / 65535.0));
    const float mn = h.min_value;
    for (int64_t i = 0; i < R * C; i++) {
      uint16_t q;
      std::memcpy(&q, p + 2 * i, 2);
      const float prod = static_cast<float>(q) * inc;
      out[i] = mn + prod;
    }
  } else {
    const float inc = static_cast<float>(h.range * (1.0 / 255.0));
    const float mn = h.min_value;
    for (int64_t i = 0; i < R * C; i++) {
      const float prod = static_cast<float>(p[i]) * inc;
      out[i] = mn + prod;
    }
  }
}

}  // namespace kaldi
}  // namespace pkwrap
