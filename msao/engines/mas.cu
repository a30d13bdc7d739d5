// Fused MAS pass: per-token saliency, relevance and change, and their reductions, in one launch.
//
// Must compute what msao/engines/mas.py mas_scores_from_tensors defines (the NumPy reference);
// tests/engines/test_mas_cuda.py compares the two. Inputs are float32, all arithmetic is
// float64 (so results differ from the reference only by summation order, ~1e-15 relative),
// and every reduction runs in a fixed order, so a run is bit-reproducible on one device.
//
// One thread block per image (gridDim.x = batch). The block sweeps the token matrix:
//
//   F (N, Dv) ─col mean─► mu ─row dist─► d_i ─mean─► dbar ─trimmed col mean─► b ─row dist─► s_i, max s
//   T (N, D)  ─col mean─► Tbar ─row: cos(T_i - Tbar, Q_j) over j─► r_i = max_j, max r
//   P (N, D)  ─row: ||T_i - P_i||² / (||P_i||² + eps)─► c_i
//
// F is read four times and T twice; the first read comes from DRAM, later ones from L2
// (64 x 128 x 4 B = 32 KB for msao-tiny-cloud; 576 x 1024 x 4 B = 2.4 MB for LLaVA-1.5, within
// Orin's 4 MB L2). The keep-set is computed on the host from these scores by the same Python
// code as the reference path (it sorts N integers; not worth a device sort at N <= 4096).
//
// Shared memory (dynamic): (max(Dv, D) + N + M) doubles; the binding checks it fits.

#define MAS_EPS 1e-12
#define MAS_TRIM_SLACK (1.0 + 1e-9)  // mas.py: _TRIM_SLACK; equal distances land on one side everywhere
#define WARP 32

__device__ __forceinline__ double warp_sum(double v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    return v;  // lane 0 holds the sum; fixed tree order, deterministic
}

extern "C" __global__ void mas_fused(
    const float* __restrict__ F, const float* __restrict__ T, const float* __restrict__ Q,
    const float* __restrict__ P,  // nullptr: no previous frame
    int n, int dv, int d, int m,
    double* __restrict__ saliency,    // (B, N)
    double* __restrict__ relevance,   // (B, N)
    double* __restrict__ change,      // (B, N), written only when P != nullptr
    double* __restrict__ reductions)  // (B, 2): saliency_max, grounding (max relevance)
{
    extern __shared__ double shm[];
    const int wide = dv > d ? dv : d;
    double* vec = shm;               // (max(Dv, D),): mu, then background b, then Tbar
    double* row = shm + wide;        // (N,): d_i, then s_i, then r_i
    double* qnorm = row + n;         // (M,)
    __shared__ double dbar;
    __shared__ int kept;

    const int img = blockIdx.x;
    F += (size_t)img * n * dv;
    T += (size_t)img * n * d;
    Q += (size_t)img * m * d;
    if (P) P += (size_t)img * n * d;
    saliency += (size_t)img * n;
    relevance += (size_t)img * n;
    if (P) change += (size_t)img * n;
    reductions += (size_t)img * 2;

    const int tid = threadIdx.x, lane = tid % WARP, warp = tid / WARP, warps = blockDim.x / WARP;

    // 1. mu = mean_i F_i  (Dv,)
    for (int c = tid; c < dv; c += blockDim.x) {
        double acc = 0.0;
        for (int i = 0; i < n; ++i) acc += (double)F[(size_t)i * dv + c];
        vec[c] = acc / n;
    }
    __syncthreads();
    // 2. d_i = ||F_i - mu||²
    for (int i = warp; i < n; i += warps) {
        double acc = 0.0;
        for (int c = lane; c < dv; c += WARP) { double x = (double)F[(size_t)i * dv + c] - vec[c]; acc += x * x; }
        acc = warp_sum(acc);
        if (lane == 0) row[i] = acc;
    }
    __syncthreads();
    // 3. dbar = mean_i d_i (times the slack), and how many tokens are no farther than that
    if (tid == 0) {
        double acc = 0.0;
        for (int i = 0; i < n; ++i) acc += row[i];
        dbar = acc / n * MAS_TRIM_SLACK;
        int k = 0;
        for (int i = 0; i < n; ++i) k += row[i] <= dbar;
        kept = k;
    }
    __syncthreads();
    // 4. background b = mean of F_i over {i : d_i <= dbar}  (overwrites mu: every use of mu is done)
    for (int c = tid; c < dv; c += blockDim.x) {
        double acc = 0.0;
        for (int i = 0; i < n; ++i) if (row[i] <= dbar) acc += (double)F[(size_t)i * dv + c];
        vec[c] = acc / kept;
    }
    __syncthreads();
    // 5. s_i = ||F_i - b||²
    for (int i = warp; i < n; i += warps) {
        double acc = 0.0;
        for (int c = lane; c < dv; c += WARP) { double x = (double)F[(size_t)i * dv + c] - vec[c]; acc += x * x; }
        acc = warp_sum(acc);
        if (lane == 0) { row[i] = acc; saliency[i] = acc; }
    }
    __syncthreads();
    if (tid == 0) {
        double mx = row[0];
        for (int i = 1; i < n; ++i) mx = row[i] > mx ? row[i] : mx;
        reductions[0] = mx;
    }
    __syncthreads();
    // 6. Tbar = mean_i T_i  (D,), and the norm of every content word
    for (int c = tid; c < d; c += blockDim.x) {
        double acc = 0.0;
        for (int i = 0; i < n; ++i) acc += (double)T[(size_t)i * d + c];
        vec[c] = acc / n;
    }
    for (int j = warp; j < m; j += warps) {
        double acc = 0.0;
        for (int c = lane; c < d; c += WARP) { double x = (double)Q[(size_t)j * d + c]; acc += x * x; }
        acc = warp_sum(acc);
        if (lane == 0) qnorm[j] = sqrt(acc);
    }
    __syncthreads();
    // 7. r_i = max_j cos(T_i - Tbar, Q_j); c_i = ||T_i - P_i||² / (||P_i||² + eps)
    for (int i = warp; i < n; i += warps) {
        const float* t = T + (size_t)i * d;
        double tn = 0.0;
        for (int c = lane; c < d; c += WARP) { double x = (double)t[c] - vec[c]; tn += x * x; }
        tn = sqrt(__shfl_sync(0xffffffffu, warp_sum(tn), 0));
        double best = -1.0e300;
        for (int j = 0; j < m; ++j) {
            const float* q = Q + (size_t)j * d;
            double dot = 0.0;
            for (int c = lane; c < d; c += WARP) dot += ((double)t[c] - vec[c]) * (double)q[c];
            dot = __shfl_sync(0xffffffffu, warp_sum(dot), 0);
            double den = tn * qnorm[j];
            double cs = dot / (den > MAS_EPS ? den : MAS_EPS);
            best = cs > best ? cs : best;
        }
        if (lane == 0) { row[i] = best; relevance[i] = best; }
        if (P) {
            const float* p = P + (size_t)i * d;
            double num = 0.0, den = 0.0;
            for (int c = lane; c < d; c += WARP) {
                double pc = (double)p[c], x = (double)t[c] - pc;
                num += x * x; den += pc * pc;
            }
            num = warp_sum(num); den = warp_sum(den);
            if (lane == 0) change[i] = num / (den + MAS_EPS);
        }
    }
    __syncthreads();
    if (tid == 0) {
        double mx = row[0];
        for (int i = 1; i < n; ++i) mx = row[i] > mx ? row[i] : mx;
        reductions[1] = mx;
    }
}
