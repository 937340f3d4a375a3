// The op library the primitives register in: attn_kernels_cuda, implemented for CUDA tensors,
// or, in the emulation build (AK_EMULATION), attn_kernels_emulated for CPU tensors. The two are
// separate libraries with the same schemas, so both builds can be loaded in one process.
#pragma once

#ifdef AK_EMULATION
#define AK_LIBRARY attn_kernels_emulated
#define AK_DISPATCH_KEY CPU
#define AK_MODULE_INIT PyInit__emulated
#define AK_MODULE_NAME "_emulated"
#else
#define AK_LIBRARY attn_kernels_cuda
#define AK_DISPATCH_KEY CUDA
#define AK_MODULE_INIT PyInit__C
#define AK_MODULE_NAME "_C"
#endif

// TORCH_LIBRARY and TORCH_LIBRARY_IMPL paste their namespace argument into names, so AK_LIBRARY
// must be expanded by a macro in between.
#define AK_TORCH_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define AK_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
