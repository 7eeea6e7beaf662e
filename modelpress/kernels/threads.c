/* Thread-pool control and what this build is (kernels/__init__.py reads mp_simd, mp_max_rows). */

/* Hands back the calling thread's OpenMP workers (its thread pool; the next parallel region on that
 * thread starts a new one). libgomp gives every thread that starts parallel regions a pool of its
 * own, and once it manages more threads than there are CPUs it stops spinning between regions
 * (1000 spins instead of ~300000): its workers sleep and are woken by the kernel at every region.
 * An engine stepped on a thread of its own, beside the pool that loading the model made on the
 * main thread, ran a 32 x 128 batch ~20 % slower so (80000 context switches against 3). */
extern int omp_pause_resource_all(int kind) __attribute__((weak));  /* OpenMP 5.0: libgomp since GCC 9 */
void mp_release_threads(void) {
    if (omp_pause_resource_all) omp_pause_resource_all(2);   /* omp_pause_hard */
}


int mp_max_rows(void) { return MP_MAX_ROWS; }

int mp_simd(void) { /* 2: AVX2 and the AVX-512 VNNI block dots, 1: the AVX2 loops, 0: the plain C ones */
#if defined(MP_VNNI512)
    return 2;
#elif defined(MP_AVX2)
    return 1;
#else
    return 0;
#endif
}
