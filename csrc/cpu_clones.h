// Building CPU loops once per x86 vector ISA.
//
// CLONES: GCC target_clones for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and the
// baseline; the loader picks the widest the CPU has, so a cached build stays
// portable while the loops use the widest vectors. ALWAYS_INLINE: the helpers a
// cloned function calls must inline into it to be compiled for its ISA.
// FUSELM_X86: defined where the clones (and x86 intrinsics) are available.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FUSELM_X86 1
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif
