// Building CPU loops once per x86 vector ISA.
//
// CLONES: GCC target_clones for AVX-512 (x86-64-v4), AVX2 (x86-64-v3) and the
// baseline; the loader picks the widest the CPU has, so a cached build stays
// portable while the loops use the widest vectors. ALWAYS_INLINE: the helpers a
// cloned function calls must inline into it to be compiled for its ISA.
// FUSELM_X86: defined where the clones (and x86 intrinsics) are available.
//
// TARGET_V4 / TARGET_V3 and x86_width(): for loops written over vectors of a
// width W of their own (GCC vector types), one clone body cannot serve every
// ISA: a vector wider than the registers is kept on the stack. Such a loop is a
// template on W, built once per ISA in a TARGET_ function, and the caller picks
// the build x86_width() names.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FUSELM_X86 1
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define TARGET_V4 __attribute__((target("arch=x86-64-v4")))
#define TARGET_V3 __attribute__((target("arch=x86-64-v3")))
// The always-inlined vector helpers return vectors wider than the baseline's registers; they are only
// ever inlined into builds that have them, so the ABI note GCC prints for each is moot.
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define CLONES
#endif

#if defined(__GNUC__)
#define ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define ALWAYS_INLINE inline
#endif

#ifdef FUSELM_X86
// Float lanes of the widest vector registers the CPU has (x86-64-v4: 16, v3: 8, else 4), as the
// target_clones resolver chooses.
inline int x86_width() {
  static const int width = (__builtin_cpu_init(), __builtin_cpu_supports("x86-64-v4"))   ? 16
                           : __builtin_cpu_supports("x86-64-v3")                        ? 8
                                                                                         : 4;
  return width;
}
#endif
