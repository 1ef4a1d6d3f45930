// Joseph forward and back projectors, non-TOF and TOF, for three kinds of
// LOR geometry: explicit end points, sinogram bins and listmode events.
//
// One thread = one LOR.  Forward kernels write every output element they own
// (zero for rays that miss the image).  Back-projection kernels ACCUMULATE
// into the image with atomic adds; the caller zeroes the image first.
//
// Memory layout and units (see recon/geometry.py for the full statement):
//   * image: float32, C order over (x, y, z): flat = (i * ny + j) * nz + k
//   * image_origin[3]: centre of voxel (0, 0, 0) in mm; voxel_size[3] in mm
//   * line integrals are in image units x mm
//   * TOF bins: bin k is centred (k - (num_tof_bins - 1) / 2) * tof_bin_width
//     mm from the LOR midpoint, positive towards the LOR end point.
//
// Joseph's method (Joseph 1982, IEEE TMI 1:192): step through the planes of
// voxel centres perpendicular to the axis along which the LOR advances
// fastest (in voxel units); in each plane bilinearly interpolate the image;
// each sample is weighted by the ray length between planes.
#include "compat.cuh"

// Plain comparisons: fminf/fmaxf may become library calls on the host.
PB_DEVICE float pb_min(float a, float b) { return a < b ? a : b; }
PB_DEVICE float pb_max(float a, float b) { return a > b ? a : b; }

// Intersect [ilo, ihi] with the plane indices i for which
// lo <= x0 + i * dx <= hi.  Returns false when the result is empty.
PB_DEVICE bool clip_plane_range(float x0, float dx, float lo, float hi, float& ilo, float& ihi) {
    if (dx == 0.0f) return x0 >= lo && x0 <= hi && ilo <= ihi;
    float e1 = (lo - x0) / dx;
    float e2 = (hi - x0) / dx;
    if (e1 > e2) {
        const float tmp = e1;
        e1 = e2;
        e2 = tmp;
    }
    ilo = pb_max(ilo, e1);
    ihi = pb_min(ihi, e2);
    return ilo <= ihi;
}

struct JosephRay {
    int a, b, c;       // principal axis and the two others
    int nb, nc;        // image size along b and c
    int sa, sb, sc;    // flat-index strides along a, b, c
    float ub0, dub;    // coordinate along b (voxel units) at plane 0, change per plane
    float uc0, duc;    // same along c
    float t0, dt;      // ray parameter at plane 0, change per plane
    float length;      // LOR length (mm)
    float step_mm;     // ray length per plane (mm)
};

// The four image neighbours of a sample in its plane and the bilinear
// fractions along b and c.  Index -1 marks a neighbour outside the image
// (only possible when Checked).
struct Bilinear {
    int idx[4];  // (jb, jc), (jb+1, jc), (jb, jc+1), (jb+1, jc+1)
    float wb, wc;

    template <bool Checked>
    PB_METHOD float corner(const float* image, int q) const {
        return (!Checked || idx[q] >= 0) ? image[idx[q]] : 0.0f;
    }

    // Interpolated image value (two lerps along b, one along c).
    template <bool Checked>
    PB_METHOD float gather(const float* image) const {
        const float v0 = corner<Checked>(image, 0);
        const float v1 = corner<Checked>(image, 1);
        const float v2 = corner<Checked>(image, 2);
        const float v3 = corner<Checked>(image, 3);
        const float lo = v0 + wb * (v1 - v0);
        const float hi = v2 + wb * (v3 - v2);
        return lo + wc * (hi - lo);
    }

    // Adjoint of gather: add value x weight to each neighbour.
    template <bool Checked>
    PB_METHOD void scatter(float* image, float value) const {
        const float w[4] = {(1.0f - wb) * (1.0f - wc), wb * (1.0f - wc), (1.0f - wb) * wc, wb * wc};
        for (int q = 0; q < 4; ++q)
            if (!Checked || idx[q] >= 0) pb_atomic_add(&image[idx[q]], w[q] * value);
    }
};

// One Joseph sample at plane i; Checked marks neighbours outside the image
// (the interior range skips those tests).
template <bool Checked, class Op>
PB_DEVICE void joseph_sample(const JosephRay& r, int i, Op& op) {
    const float ub = r.ub0 + i * r.dub;
    const float uc = r.uc0 + i * r.duc;
    const float fb = floorf(ub);
    const float fc = floorf(uc);
    const int jb = (int)fb;
    const int jc = (int)fc;
    const int base = i * r.sa + jb * r.sb + jc * r.sc;
    Bilinear n = {{base, base + r.sb, base + r.sc, base + r.sb + r.sc}, ub - fb, uc - fc};
    if (Checked) {
        const bool b0 = (jb >= 0) && (jb < r.nb);
        const bool b1 = (jb + 1 >= 0) && (jb + 1 < r.nb);
        const bool c0 = (jc >= 0) && (jc < r.nc);
        const bool c1 = (jc + 1 >= 0) && (jc + 1 < r.nc);
        if (!(b0 && c0)) n.idx[0] = -1;
        if (!(b1 && c0)) n.idx[1] = -1;
        if (!(b0 && c1)) n.idx[2] = -1;
        if (!(b1 && c1)) n.idx[3] = -1;
    }
    op.template sample<Checked>(n, r.step_mm, (r.t0 + i * r.dt - 0.5f) * r.length);
}

// ---------------------------------------------------------------------------
// The ray walker.  `Op::sample<Checked>` receives each sample: its bilinear
// neighbourhood, the ray length per sample (mm, the same for every sample of
// a LOR) and the sample's signed distance from the LOR midpoint (mm).
// Returns the ray length per sample, so that forward operations can sum
// unscaled values and multiply once.
// ---------------------------------------------------------------------------
template <class Op>
PB_DEVICE float joseph_walk(const float* start, const float* end, const float* image_origin, const float* voxel_size,
                           const int* image_shape, Op& op) {
    const float d[3] = {end[0] - start[0], end[1] - start[1], end[2] - start[2]};
    const float dv[3] = {fabsf(d[0]) / voxel_size[0], fabsf(d[1]) / voxel_size[1], fabsf(d[2]) / voxel_size[2]};
    const int a = (dv[0] >= dv[1] && dv[0] >= dv[2]) ? 0 : (dv[1] >= dv[2] ? 1 : 2);
    if (d[a] == 0.0f) return 0.0f;  // degenerate LOR (start == end)
    const int b = (a + 1) % 3;
    const int c = (a + 2) % 3;
    const int stride[3] = {image_shape[1] * image_shape[2], image_shape[2], 1};
    const float length = sqrtf(d[0] * d[0] + d[1] * d[1] + d[2] * d[2]);
    const float step_mm = voxel_size[a] * length / fabsf(d[a]);

    // Ray parameter t in [0, 1] from start to end; plane i of axis a is hit at
    // t_i = t0 + i * dt, where the other two coordinates (in voxel index
    // units) are u_b = ub0 + i * dub and u_c = uc0 + i * duc.
    const float dt = voxel_size[a] / d[a];
    const float t0 = (image_origin[a] - start[a]) / d[a];
    const float ub0 = (start[b] + t0 * d[b] - image_origin[b]) / voxel_size[b];
    const float dub = dt * d[b] / voxel_size[b];
    const float uc0 = (start[c] + t0 * d[c] - image_origin[c]) / voxel_size[c];
    const float duc = dt * d[c] / voxel_size[c];

    // Restrict the plane range analytically so misses cost nothing: each
    // condition lo <= x0 + i * dx <= hi bounds i.  Inside the "interior" range
    // all four bilinear neighbours lie in the image and need no checks.
    const int nb = image_shape[b];
    const int nc = image_shape[c];
    float ilo = 0.0f;
    float ihi = (float)(image_shape[a] - 1);
    if (!clip_plane_range(t0, dt, 0.0f, 1.0f, ilo, ihi)) return 0.0f;
    if (!clip_plane_range(ub0, dub, -1.0f, (float)nb, ilo, ihi)) return 0.0f;
    if (!clip_plane_range(uc0, duc, -1.0f, (float)nc, ilo, ihi)) return 0.0f;
    const int i0 = (int)ceilf(ilo);
    const int i1 = (int)floorf(ihi);
    if (i0 > i1) return 0.0f;
    // A small margin keeps rounding from putting an "interior" sample outside.
    const float margin = 1e-3f;
    float jlo = ilo, jhi = ihi;
    const bool has_interior = clip_plane_range(ub0, dub, margin, nb - 1 - margin, jlo, jhi) &&
                              clip_plane_range(uc0, duc, margin, nc - 1 - margin, jlo, jhi);
    int j0 = has_interior ? (int)ceilf(jlo) : i1 + 1;
    int j1 = has_interior ? (int)floorf(jhi) : i1;
    if (j0 < i0) j0 = i0;
    if (j1 > i1) j1 = i1;
    if (j0 > j1) {
        j0 = i1 + 1;
        j1 = i1;
    }
    const JosephRay ray = {a, b, c, nb, nc, stride[a], stride[b], stride[c], ub0, dub, uc0, duc, t0, dt, length, step_mm};
    for (int i = i0; i < j0; ++i) joseph_sample<true>(ray, i, op);
    for (int i = j0; i <= j1; ++i) joseph_sample<false>(ray, i, op);
    for (int i = j1 + 1; i <= i1; ++i) joseph_sample<true>(ray, i, op);
    return step_mm;
}

// ---------------------------------------------------------------------------
// TOF weights.  The Gaussian TOF kernel (sigma in mm) centred on a sample is
// truncated at +-num_sigmas and renormalised over the bins it overlaps, so
// the weights of one sample sum to exactly 1 whenever it overlaps any bin:
// summing a TOF projection over its bins gives the non-TOF projection.
// ---------------------------------------------------------------------------
struct TofParams {
    int num_bins;
    float bin_width;   // mm
    float sigma;       // mm
    float num_sigmas;  // truncation
};

// Cumulative Gaussian mass (up to a factor 1/2) at `edge` for a kernel centred at x.
PB_DEVICE float tof_cdf(float edge, float x, const TofParams& p) {
    const float half = p.num_sigmas * p.sigma;
    const float e = pb_min(pb_max(edge, x - half), x + half);
    return pb_erf((e - x) * (0.70710678118654752f / p.sigma));
}

// First and last bin overlapping the truncated kernel at x; false if none.
PB_DEVICE bool tof_window(float x, const TofParams& p, int& k0, int& k1) {
    const float half = p.num_sigmas * p.sigma;
    const float centre = 0.5f * (p.num_bins - 1);
    k0 = (int)floorf((x - half) / p.bin_width + centre + 0.5f);
    k1 = (int)floorf((x + half) / p.bin_width + centre + 0.5f);
    if (k0 < 0) k0 = 0;
    if (k1 > p.num_bins - 1) k1 = p.num_bins - 1;
    return k0 <= k1;
}

PB_DEVICE float tof_bin_lower_edge(int k, const TofParams& p) {
    return (k - 0.5f * (p.num_bins - 1) - 0.5f) * p.bin_width;
}

// Weight of bin k (which must lie inside [k0, k1]) for a sample at x.
PB_DEVICE float tof_weight_single(int k, float x, int k0, int k1, const TofParams& p) {
    const float total = tof_cdf(tof_bin_lower_edge(k1 + 1, p), x, p) - tof_cdf(tof_bin_lower_edge(k0, p), x, p);
    if (total <= 0.0f) return 0.0f;
    return (tof_cdf(tof_bin_lower_edge(k + 1, p), x, p) - tof_cdf(tof_bin_lower_edge(k, p), x, p)) / total;
}

// ---------------------------------------------------------------------------
// Sample operations (gather for forward, scatter for back).
// ---------------------------------------------------------------------------
// Forward operations sum unscaled samples; the caller multiplies by the
// ray length per sample that joseph_walk returns.
struct ForwardOp {
    const float* image;
    float sum;
    template <bool Checked>
    PB_METHOD void sample(const Bilinear& n, float, float) {
        sum += n.gather<Checked>(image);
    }
};

struct BackOp {
    float* image;
    float value;
    template <bool Checked>
    PB_METHOD void sample(const Bilinear& n, float step_mm, float) {
        n.scatter<Checked>(image, value * step_mm);
    }
};

// All TOF bins of one LOR: out[0..num_bins) must be zeroed by the caller.
struct ForwardTofAllOp {
    const float* image;
    float* out;
    TofParams tof;
    template <bool Checked>
    PB_METHOD void sample(const Bilinear& n, float, float x) {
        const float v = n.gather<Checked>(image);
        if (v == 0.0f) return;
        int k0, k1;
        if (!tof_window(x, tof, k0, k1)) return;
        float lower = tof_cdf(tof_bin_lower_edge(k0, tof), x, tof);
        const float total = tof_cdf(tof_bin_lower_edge(k1 + 1, tof), x, tof) - lower;
        if (total <= 0.0f) return;
        const float scale = v / total;
        for (int k = k0; k <= k1; ++k) {
            const float upper = tof_cdf(tof_bin_lower_edge(k + 1, tof), x, tof);
            out[k] += scale * (upper - lower);
            lower = upper;
        }
    }
};

struct BackTofAllOp {
    float* image;
    const float* values;
    TofParams tof;
    template <bool Checked>
    PB_METHOD void sample(const Bilinear& n, float step_mm, float x) {
        int k0, k1;
        if (!tof_window(x, tof, k0, k1)) return;
        float lower = tof_cdf(tof_bin_lower_edge(k0, tof), x, tof);
        const float total = tof_cdf(tof_bin_lower_edge(k1 + 1, tof), x, tof) - lower;
        if (total <= 0.0f) return;
        float acc = 0.0f;
        for (int k = k0; k <= k1; ++k) {
            const float upper = tof_cdf(tof_bin_lower_edge(k + 1, tof), x, tof);
            acc += values[k] * (upper - lower);
            lower = upper;
        }
        const float s = acc * step_mm / total;
        if (s != 0.0f) n.scatter<Checked>(image, s);
    }
};

// One TOF bin per LOR (listmode events).
struct ForwardTofOneOp {
    const float* image;
    int bin;
    float sum;
    TofParams tof;
    template <bool Checked>
    PB_METHOD void sample(const Bilinear& n, float, float x) {
        int k0, k1;
        if (!tof_window(x, tof, k0, k1) || bin < k0 || bin > k1) return;
        sum += n.gather<Checked>(image) * tof_weight_single(bin, x, k0, k1, tof);
    }
};

struct BackTofOneOp {
    float* image;
    int bin;
    float value;
    TofParams tof;
    template <bool Checked>
    PB_METHOD void sample(const Bilinear& n, float step_mm, float x) {
        int k0, k1;
        if (!tof_window(x, tof, k0, k1) || bin < k0 || bin > k1) return;
        n.scatter<Checked>(image, value * step_mm * tof_weight_single(bin, x, k0, k1, tof));
    }
};

// ---------------------------------------------------------------------------
// LOR geometries: fill start[3] and end[3] for LOR n.
// ---------------------------------------------------------------------------

// Explicit end points: lor_start/lor_end are (N, 3) arrays in mm.
PB_DEVICE void endpoints_explicit(long long n, const float* lor_start, const float* lor_end, float* s, float* e) {
    for (int q = 0; q < 3; ++q) {
        s[q] = lor_start[3 * n + q];
        e[q] = lor_end[3 * n + q];
    }
}

// Sinogram bin n of a (plane, view-subset, radial) array.  crystal_xy is
// (crystals_per_ring, 2) mm, plane_z is (num_planes, 2) mm (axial position
// of the start and end of each plane's LOR), views lists the view of each
// subset row.  Crystal pairing as documented in recon.geometry.SinogramLayout.
PB_DEVICE void endpoints_sinogram(long long n, const float* crystal_xy, const float* plane_z, const int* views,
                                  int crystals_per_ring, int num_subset_views, int num_radial, float* s, float* e) {
    const int r = (int)(n % num_radial);
    const long long pv = n / num_radial;
    const int vi = (int)(pv % num_subset_views);
    const long long p = pv / num_subset_views;
    const int v = views[vi];
    const int sr = r - num_radial / 2;
    // floor(sr / 2) and ceil(sr / 2) for negative sr too
    const int fl = (sr >= 0) ? sr / 2 : -((-sr + 1) / 2);
    const int ce = (sr >= 0) ? (sr + 1) / 2 : -((-sr) / 2);
    const int n_c = crystals_per_ring;
    const int c1 = ((v - fl) % n_c + n_c) % n_c;
    const int c2 = ((v + n_c / 2 + ce) % n_c + n_c) % n_c;
    s[0] = crystal_xy[2 * c1];
    s[1] = crystal_xy[2 * c1 + 1];
    s[2] = plane_z[2 * p];
    e[0] = crystal_xy[2 * c2];
    e[1] = crystal_xy[2 * c2 + 1];
    e[2] = plane_z[2 * p + 1];
}

// Listmode event n: detector ids (N, 2) into a (num_detectors, 3) table.
PB_DEVICE void endpoints_listmode(long long n, const float* detector_xyz, const int* detector_ids, float* s, float* e) {
    const long long d1 = detector_ids[2 * n];
    const long long d2 = detector_ids[2 * n + 1];
    for (int q = 0; q < 3; ++q) {
        s[q] = detector_xyz[3 * d1 + q];
        e[q] = detector_xyz[3 * d2 + q];
    }
}

// ---------------------------------------------------------------------------
// Per-LOR workers shared by every geometry.
// ---------------------------------------------------------------------------
PB_DEVICE void lor_forward(const float* s, const float* e, const float* image, const float* image_origin,
                           const float* voxel_size, const int* image_shape, float* out) {
    ForwardOp op = {image, 0.0f};
    const float step_mm = joseph_walk(s, e, image_origin, voxel_size, image_shape, op);
    *out = op.sum * step_mm;
}

PB_DEVICE void lor_back(const float* s, const float* e, float value, const float* image_origin,
                        const float* voxel_size, const int* image_shape, float* image) {
    if (value == 0.0f) return;
    BackOp op = {image, value};
    joseph_walk(s, e, image_origin, voxel_size, image_shape, op);
}

// A LOR's TOF bins live in a per-thread array while it is walked, so each
// sample updates registers/local memory (thread-interleaved, coalesced on a
// GPU) instead of read-modify-writing global memory with a stride of
// num_tof_bins between neighbouring threads; the bins are written once at
// the end.  More bins than this fall back to working in global memory.
#define PB_MAX_LOCAL_TOF_BINS 64

PB_DEVICE void lor_forward_tof(const float* s, const float* e, const float* image, const float* image_origin,
                               const float* voxel_size, const int* image_shape, const TofParams& tof, float* out) {
    float local[PB_MAX_LOCAL_TOF_BINS];
    float* acc = tof.num_bins <= PB_MAX_LOCAL_TOF_BINS ? local : out;
    for (int k = 0; k < tof.num_bins; ++k) acc[k] = 0.0f;
    ForwardTofAllOp op = {image, acc, tof};
    const float step_mm = joseph_walk(s, e, image_origin, voxel_size, image_shape, op);
    for (int k = 0; k < tof.num_bins; ++k) out[k] = acc[k] * step_mm;
}

PB_DEVICE void lor_back_tof(const float* s, const float* e, const float* values, const float* image_origin,
                            const float* voxel_size, const int* image_shape, const TofParams& tof, float* image) {
    float local[PB_MAX_LOCAL_TOF_BINS];
    const bool fits = tof.num_bins <= PB_MAX_LOCAL_TOF_BINS;
    bool any = false;
    for (int k = 0; k < tof.num_bins; ++k) {
        const float v = values[k];
        if (fits) local[k] = v;
        any = any || (v != 0.0f);
    }
    if (!any) return;
    BackTofAllOp op = {image, fits ? local : values, tof};
    joseph_walk(s, e, image_origin, voxel_size, image_shape, op);
}

// Back-projection of one value per LOR copied into every TOF bin, i.e. the
// adjoint of summing a TOF projection over its bins.  A sample's TOF weights
// sum to exactly 1 whenever its truncated kernel overlaps a bin (and to 0
// otherwise), so no loop over bins is needed: this is how the TOF
// sensitivity A^T 1 costs about as much as the non-TOF one.
struct BackTofSummedOp {
    float* image;
    float value;
    TofParams tof;
    template <bool Checked>
    PB_METHOD void sample(const Bilinear& n, float step_mm, float x) {
        int k0, k1;
        if (!tof_window(x, tof, k0, k1)) return;
        const float total = tof_cdf(tof_bin_lower_edge(k1 + 1, tof), x, tof) - tof_cdf(tof_bin_lower_edge(k0, tof), x, tof);
        if (total > 0.0f) n.scatter<Checked>(image, value * step_mm);
    }
};

// ---------------------------------------------------------------------------
// Kernels.  Argument order: geometry, input, grid, [TOF], output, count.
// ---------------------------------------------------------------------------
#define PB_TOF_ARGS int num_tof_bins, float tof_bin_width, float tof_sigma, float tof_num_sigmas
#define PB_TOF_PARAMS {num_tof_bins, tof_bin_width, tof_sigma, tof_num_sigmas}

PB_KERNEL void joseph_forward_lor(const float* lor_start, const float* lor_end, const float* image,
                                  const float* image_origin, const float* voxel_size, const int* image_shape,
                                  float* projection, long long num_lors) {
    const long long n = pb_thread_index();
    if (n >= num_lors) return;
    float s[3], e[3];
    endpoints_explicit(n, lor_start, lor_end, s, e);
    lor_forward(s, e, image, image_origin, voxel_size, image_shape, projection + n);
}

PB_KERNEL void joseph_back_lor(const float* lor_start, const float* lor_end, const float* projection,
                               const float* image_origin, const float* voxel_size, const int* image_shape,
                               float* image, long long num_lors) {
    const long long n = pb_thread_index();
    if (n >= num_lors) return;
    float s[3], e[3];
    endpoints_explicit(n, lor_start, lor_end, s, e);
    lor_back(s, e, projection[n], image_origin, voxel_size, image_shape, image);
}

PB_KERNEL void joseph_forward_lor_tof(const float* lor_start, const float* lor_end, const float* image,
                                      const float* image_origin, const float* voxel_size, const int* image_shape,
                                      PB_TOF_ARGS, float* projection, long long num_lors) {
    const long long n = pb_thread_index();
    if (n >= num_lors) return;
    float s[3], e[3];
    endpoints_explicit(n, lor_start, lor_end, s, e);
    const TofParams tof = PB_TOF_PARAMS;
    lor_forward_tof(s, e, image, image_origin, voxel_size, image_shape, tof, projection + n * num_tof_bins);
}

PB_KERNEL void joseph_back_lor_tof(const float* lor_start, const float* lor_end, const float* projection,
                                   const float* image_origin, const float* voxel_size, const int* image_shape,
                                   PB_TOF_ARGS, float* image, long long num_lors) {
    const long long n = pb_thread_index();
    if (n >= num_lors) return;
    float s[3], e[3];
    endpoints_explicit(n, lor_start, lor_end, s, e);
    const TofParams tof = PB_TOF_PARAMS;
    lor_back_tof(s, e, projection + n * num_tof_bins, image_origin, voxel_size, image_shape, tof, image);
}

#define PB_SINO_ARGS                                                                                      \
    const float *crystal_xy, const float *plane_z, const int *views, int crystals_per_ring, int num_subset_views, \
        int num_radial
#define PB_SINO_ENDPOINTS(n)                                                                               \
    float s[3], e[3];                                                                                      \
    endpoints_sinogram(n, crystal_xy, plane_z, views, crystals_per_ring, num_subset_views, num_radial, s, e)

PB_KERNEL void joseph_forward_sino(PB_SINO_ARGS, const float* image, const float* image_origin,
                                   const float* voxel_size, const int* image_shape, float* projection,
                                   long long num_lors) {
    const long long n = pb_thread_index();
    if (n >= num_lors) return;
    PB_SINO_ENDPOINTS(n);
    lor_forward(s, e, image, image_origin, voxel_size, image_shape, projection + n);
}

PB_KERNEL void joseph_back_sino(PB_SINO_ARGS, const float* projection, const float* image_origin,
                                const float* voxel_size, const int* image_shape, float* image, long long num_lors) {
    const long long n = pb_thread_index();
    if (n >= num_lors) return;
    PB_SINO_ENDPOINTS(n);
    lor_back(s, e, projection[n], image_origin, voxel_size, image_shape, image);
}

PB_KERNEL void joseph_forward_sino_tof(PB_SINO_ARGS, const float* image, const float* image_origin,
                                       const float* voxel_size, const int* image_shape, PB_TOF_ARGS,
                                       float* projection, long long num_lors) {
    const long long n = pb_thread_index();
    if (n >= num_lors) return;
    PB_SINO_ENDPOINTS(n);
    const TofParams tof = PB_TOF_PARAMS;
    lor_forward_tof(s, e, image, image_origin, voxel_size, image_shape, tof, projection + n * num_tof_bins);
}

PB_KERNEL void joseph_back_sino_tof(PB_SINO_ARGS, const float* projection, const float* image_origin,
                                    const float* voxel_size, const int* image_shape, PB_TOF_ARGS, float* image,
                                    long long num_lors) {
    const long long n = pb_thread_index();
    if (n >= num_lors) return;
    PB_SINO_ENDPOINTS(n);
    const TofParams tof = PB_TOF_PARAMS;
    lor_back_tof(s, e, projection + n * num_tof_bins, image_origin, voxel_size, image_shape, tof, image);
}

PB_KERNEL void joseph_back_sino_tof_summed(PB_SINO_ARGS, const float* lor_values, const float* image_origin,
                                           const float* voxel_size, const int* image_shape, PB_TOF_ARGS, float* image,
                                           long long num_lors) {
    const long long n = pb_thread_index();
    if (n >= num_lors) return;
    const float value = lor_values[n];
    if (value == 0.0f) return;
    PB_SINO_ENDPOINTS(n);
    BackTofSummedOp op = {image, value, PB_TOF_PARAMS};
    joseph_walk(s, e, image_origin, voxel_size, image_shape, op);
}

// Listmode: one value per event; with TOF the event's own bin only.
PB_KERNEL void joseph_forward_listmode(const float* detector_xyz, const int* detector_ids, const float* image,
                                       const float* image_origin, const float* voxel_size, const int* image_shape,
                                       float* projection, long long num_events) {
    const long long n = pb_thread_index();
    if (n >= num_events) return;
    float s[3], e[3];
    endpoints_listmode(n, detector_xyz, detector_ids, s, e);
    lor_forward(s, e, image, image_origin, voxel_size, image_shape, projection + n);
}

PB_KERNEL void joseph_back_listmode(const float* detector_xyz, const int* detector_ids, const float* projection,
                                    const float* image_origin, const float* voxel_size, const int* image_shape,
                                    float* image, long long num_events) {
    const long long n = pb_thread_index();
    if (n >= num_events) return;
    float s[3], e[3];
    endpoints_listmode(n, detector_xyz, detector_ids, s, e);
    lor_back(s, e, projection[n], image_origin, voxel_size, image_shape, image);
}

PB_KERNEL void joseph_forward_listmode_tof(const float* detector_xyz, const int* detector_ids, const int* tof_bin,
                                           const float* image, const float* image_origin, const float* voxel_size,
                                           const int* image_shape, PB_TOF_ARGS, float* projection,
                                           long long num_events) {
    const long long n = pb_thread_index();
    if (n >= num_events) return;
    float s[3], e[3];
    endpoints_listmode(n, detector_xyz, detector_ids, s, e);
    ForwardTofOneOp op = {image, tof_bin[n], 0.0f, PB_TOF_PARAMS};
    const float step_mm = joseph_walk(s, e, image_origin, voxel_size, image_shape, op);
    projection[n] = op.sum * step_mm;
}

PB_KERNEL void joseph_back_listmode_tof(const float* detector_xyz, const int* detector_ids, const int* tof_bin,
                                        const float* projection, const float* image_origin, const float* voxel_size,
                                        const int* image_shape, PB_TOF_ARGS, float* image, long long num_events) {
    const long long n = pb_thread_index();
    if (n >= num_events) return;
    if (projection[n] == 0.0f) return;
    float s[3], e[3];
    endpoints_listmode(n, detector_xyz, detector_ids, s, e);
    BackTofOneOp op = {image, tof_bin[n], projection[n], PB_TOF_PARAMS};
    joseph_walk(s, e, image_origin, voxel_size, image_shape, op);
}

// Host entry points (ctypes, CPU build only) are generated from the kernel
// declarations above by recon/kernels/__init__.py: the argument lists are
// written once, here.
