// SHA-256 (FIPS 180-4), for bearer tokens: the native front end compares the digest of a
// presented token with the stored digests (engine/auth.py keeps only digests), so the core
// needs no crypto library for it.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>

namespace vivace {

using Sha256Digest = std::array<uint8_t, 32>;

Sha256Digest Sha256(const void* data, size_t size);

// Compares two digests in time independent of where they differ.
bool DigestsEqual(const Sha256Digest& a, const Sha256Digest& b);

}  // namespace vivace
