// at::vec::Vectorized<float> for the CPU cost kernels, at the widest ISA this file is compiled
// for (setup.py: -march=native unless MASKFORMER_FAST_CPU_ARCH says otherwise).
//
// at::vec picks its implementation from CPU_CAPABILITY_* macros, which torch defines only when
// it builds its own kernels; an extension sets them from what the compiler targets. Its
// transcendental functions (exp, log1p, pow) are SLEEF's, exported by libtorch_cpu; without
// AVX2 the portable Vectorized (std:: functions, lane by lane) is used.
#pragma once

#if !defined(CPU_CAPABILITY)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#else
#define CPU_CAPABILITY DEFAULT
#endif
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
