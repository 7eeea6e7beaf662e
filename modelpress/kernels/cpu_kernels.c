/* modelpress CPU kernels, one translation unit built from files split by purpose (a unity build:
 * the compiler sees them as one file, as before the split, and inlines across them). Built at first
 * use by kernels/__init__.py; the Python side calls them through kernels/ops.py only.
 *   mp_kernels.h  includes, SIMD switches, the weight kinds (KIND in Python), vector helpers
 *   threads.c     thread-pool control, which build this is
 *   gemv.c        the nn/ modules' decode products (code books, LLM.int8, fp32, affine codes)
 *   quantize.c    the GGUF searches and reference quantizers
 *   blocks.c      products on GGUF blocks with int8 activations
 *   decode.c      the fused decoder
 */
#include "mp_kernels.h"
#include "threads.c"
#include "gemv.c"
#include "quantize.c"
#include "blocks.c"
#include "decode.c"
#include "gemm_int8.c"
