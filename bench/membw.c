/* Memory read bandwidth with two threads (the decode-step bound of docs/benchmarks.md):
 * each thread sums its half of a 1 GB float array five times with AVX-512 loads.
 * gcc -O3 -mavx512f -pthread bench/membw.c -o membw && ./membw */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define N (256L * 1024 * 1024) /* floats: 1 GB */
static float *a;
static float sums[2];

static void *reader(void *p) {
    long t = (long)p, off = t * (N / 2);
    __m512 s = _mm512_setzero_ps();
    for (int r = 0; r < 5; r++)
        for (long i = off; i < off + N / 2; i += 16) s = _mm512_add_ps(s, _mm512_load_ps(a + i));
    sums[t] = _mm512_reduce_add_ps(s);
    return NULL;
}

int main(void) {
    a = aligned_alloc(64, N * 4);
    for (long i = 0; i < N; i++) a[i] = 1.0f;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    pthread_t th[2];
    for (long t = 0; t < 2; t++) pthread_create(&th[t], NULL, reader, (void *)t);
    for (int t = 0; t < 2; t++) pthread_join(th[t], NULL);
    clock_gettime(CLOCK_MONOTONIC, &t1);
    double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) * 1e-9;
    printf("2 threads read %.1f GB/s (checksum %.0f)\n", 5.0 * N * 4 / s / 1e9, sums[0] + sums[1]);
    return 0;
}
