//! The judge's statistics (see `design/guard-statistics.md`): a two-proportion test with a
//! margin, Mann-Whitney U from merged histograms (ties per bucket) with the Hodges-Lehmann
//! shift, a tail test, and the sample-ratio-mismatch chi-square. All one-sided: the guard
//! only asks whether atomic_async is worse.

use crate::samples::{BUCKETS, Histogram, bucket_ceil_ms, bucket_floor_ms};

/// `erfc(x)` (Numerical Recipes' Chebyshev fit; relative error < 1.2e-7).
pub fn erfc(x: f64) -> f64 {
    let z = x.abs();
    let t = 1.0 / (1.0 + 0.5 * z);
    let r = t
        * (-z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77)))))))))
            .exp();
    if x >= 0.0 { r } else { 2.0 - r }
}

/// `P(Z > z)` for a standard normal `Z`.
pub fn upper_tail(z: f64) -> f64 {
    0.5 * erfc(z / std::f64::consts::SQRT_2)
}

/// The `z` with `P(Z > z) = p` (bisection on [`upper_tail`]).
pub fn z_for(p: f64) -> f64 {
    let (mut lo, mut hi) = (-40.0_f64, 40.0_f64);
    for _ in 0..200 {
        let mid = (lo + hi) / 2.0;
        if upper_tail(mid) > p {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}

/// Errors: is atomic's failure rate more than `margin` above legacy's? Returns `(z, p)`.
pub fn error_rate_test(x_a: u64, n_a: u64, x_l: u64, n_l: u64, margin: f64) -> (f64, f64) {
    let (n_a, n_l) = (n_a.max(1) as f64, n_l.max(1) as f64);
    let (p_a, p_l) = (x_a as f64 / n_a, x_l as f64 / n_l);
    let (q_a, q_l) = (p_a.max(0.5 / n_a), p_l.max(0.5 / n_l));
    let se = (q_a * (1.0 - q_a) / n_a + q_l * (1.0 - q_l) / n_l).sqrt();
    let z = (p_a - p_l - margin) / se;
    (z, upper_tail(z))
}

/// Mann-Whitney U of `a` against `l` from their histograms: `(U_a, z, p)` with `p` the
/// one-sided p-value of "a is stochastically larger" (normal approximation, ties per bucket,
/// no continuity correction — scipy's `method="asymptotic", use_continuity=False`).
pub fn mann_whitney(a: &Histogram, l: &Histogram) -> (f64, f64, f64) {
    let (n_a, n_l) = (a.total() as f64, l.total() as f64);
    let n = n_a + n_l;
    if n_a == 0.0 || n_l == 0.0 {
        return (0.0, 0.0, 1.0);
    }
    let (mut u, mut below_l, mut ties) = (0.0, 0.0, 0.0);
    for b in 0..BUCKETS {
        let (ab, lb) = (a.0[b] as f64, l.0[b] as f64);
        u += ab * (below_l + lb / 2.0);
        below_l += lb;
        let t = ab + lb;
        ties += t * t * t - t;
    }
    let mu = n_a * n_l / 2.0;
    let var = n_a * n_l / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if var <= 0.0 {
        return (u, 0.0, 1.0);
    }
    let z = (u - mu) / var.sqrt();
    (u, z, upper_tail(z))
}

/// A bucket's representative latency (its midpoint).
fn midpoint(b: usize) -> f64 {
    (bucket_floor_ms(b) + bucket_ceil_ms(b)) / 2.0
}

/// The Hodges-Lehmann shift, the median of all pairwise differences `a − l`, from bucket
/// midpoints (ms); `None` when a histogram is empty.
pub fn hodges_lehmann(a: &Histogram, l: &Histogram) -> Option<f64> {
    let mut diffs: Vec<(f64, f64)> = Vec::new();
    for (i, &ca) in a.0.iter().enumerate().filter(|(_, c)| **c > 0) {
        for (j, &cl) in l.0.iter().enumerate().filter(|(_, c)| **c > 0) {
            diffs.push((midpoint(i) - midpoint(j), ca as f64 * cl as f64));
        }
    }
    let total: f64 = diffs.iter().map(|d| d.1).sum();
    if total == 0.0 {
        return None;
    }
    diffs.sort_by(|x, y| x.0.total_cmp(&y.0));
    let mut seen = 0.0;
    for (d, w) in &diffs {
        seen += w;
        if seen >= total / 2.0 {
            return Some(*d);
        }
    }
    diffs.last().map(|d| d.0)
}

/// `P(X ≥ k)` for `X ~ Binomial(n, p)`.
pub fn binomial_upper(k: u64, n: u64, p: f64) -> f64 {
    if k == 0 {
        return 1.0;
    }
    if k > n {
        return 0.0;
    }
    let (nf, kf) = (n as f64, k as f64);
    // In log space: for a large `n` the first terms underflow to 0 as plain numbers.
    let ln_c: f64 = (1..=k).map(|i| ((n - k + i) as f64 / i as f64).ln()).sum();
    let mut ln_term = ln_c + kf * p.ln() + (nf - kf) * (1.0 - p).ln();
    let mut ln_sum = f64::NEG_INFINITY;
    let mut j = k;
    while j <= n {
        ln_sum = if ln_sum > ln_term {
            ln_sum + (ln_term - ln_sum).exp().ln_1p()
        } else {
            ln_term + (ln_sum - ln_term).exp().ln_1p()
        };
        if ln_term < ln_sum - 37.0 && (j as f64) > nf * p {
            break;
        }
        ln_term += ((n - j) as f64 / (j + 1) as f64 * p / (1.0 - p)).ln();
        j += 1;
    }
    ln_sum.exp().min(1.0)
}

/// Sample-ratio mismatch: distinct drivers `d_a`, `d_l` against the expected share `q` of
/// atomic_async. Returns `(χ², p)` (one degree of freedom).
///
/// The counts are estimates (a sketch per cohort), with variances `var_a`, `var_l`: they
/// add to the binomial variance of the split. With two cells the design's
/// `(d_a − Dq)²/(Dq) + (d_l − D(1−q))²/(D(1−q))` is `((1−q)·d_a − q·d_l)² / (D·q·(1−q))`,
/// and the estimates' errors add `(1−q)²·var_a + q²·var_l` to that denominator (0: exact
/// counts, the design's χ²).
pub fn sample_ratio(d_a: f64, var_a: f64, d_l: f64, var_l: f64, q: f64) -> (f64, f64) {
    let d = d_a + d_l;
    if d <= 0.0 || q <= 0.0 || q >= 1.0 {
        return (0.0, 1.0);
    }
    let spread = d * q * (1.0 - q) + (1.0 - q).powi(2) * var_a.max(0.0) + q.powi(2) * var_l.max(0.0);
    let chi2 = ((1.0 - q) * d_a - q * d_l).powi(2) / spread;
    (chi2, erfc((chi2 / 2.0).sqrt()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_tails() {
        assert!((upper_tail(2.326_347_874) - 0.01).abs() < 1e-8);
        assert!((upper_tail(0.0) - 0.5).abs() < 1e-7);
        assert!((z_for(0.01) - 2.326_347_874).abs() < 1e-5);
        assert!((erfc(-1.0) - 1.842_700_792_9).abs() < 1e-7);
    }

    fn histogram(buckets: &[usize]) -> Histogram {
        let mut h = Histogram::default();
        for &b in buckets {
            h.0[b] += 1;
        }
        h
    }

    fn counts(from: usize, counts: &[u64]) -> Histogram {
        let mut h = Histogram::default();
        for (i, &c) in counts.iter().enumerate() {
            h.0[from + i] = c;
        }
        h
    }

    /// Reference values: `scipy.stats.mannwhitneyu(a, l, alternative="greater",
    /// method="asymptotic", use_continuity=False)` (scipy 1.16) on the bucket midpoints,
    /// and `numpy.median` of the pairwise differences.
    #[test]
    fn mann_whitney_matches_scipy() {
        let a = histogram(&[10, 12, 12, 13, 15, 15, 15]);
        let l = histogram(&[8, 9, 10, 10, 11, 12, 12, 13, 14]);
        let (u, _, p) = mann_whitney(&a, &l);
        assert_eq!(u, 49.5);
        assert!((p - 0.026_648_193_146_005_368).abs() < 1e-7, "{p}");
        let hl = hodges_lehmann(&a, &l).unwrap();
        assert!((hl - 7.498_643_824_460_208).abs() < 1e-9, "{hl}");

        let a = counts(19, &[0, 10, 8, 11, 8, 14, 12, 5, 12, 11, 10]);
        let l = counts(19, &[13, 13, 15, 15, 17, 12, 18, 14, 25, 9, 0]);
        let (u, _, p) = mann_whitney(&a, &l);
        assert_eq!(u, 8972.0);
        assert!((p - 0.008_485_367_712_994_976).abs() < 1e-7, "{p}");
        // The reverse direction is not "slower".
        assert!(mann_whitney(&l, &a).2 > 0.9);
    }

    #[test]
    fn sample_ratio_matches_scipy() {
        // chi2.sf(4.0, 1) = 0.04550026389635857: 60 vs 40 drivers at 50 %.
        let (chi2, p) = sample_ratio(60.0, 0.0, 40.0, 0.0, 0.5);
        assert!((chi2 - 4.0).abs() < 1e-12);
        assert!((p - 0.045_500_263_896_358_57).abs() < 1e-7, "{p}");
        // The same at 10 %: 20 vs 80 against 10 vs 90 (chi2.sf(100/9 + 100/81 ... ) form).
        let (chi2, _) = sample_ratio(20.0, 0.0, 80.0, 0.0, 0.1);
        assert!((chi2 - (100.0 / 10.0 + 100.0 / 90.0)).abs() < 1e-9, "{chi2}");
        // An estimate's own error widens it.
        assert!(sample_ratio(60.0, 25.0, 40.0, 25.0, 0.5).0 < 4.0);
    }

    #[test]
    fn error_rates_with_a_margin() {
        // Same rates: far from failing; atomic 10 % worse with a 1 % margin: fails.
        assert!(error_rate_test(5, 500, 5, 500, 0.01).1 > 0.9);
        assert!(error_rate_test(60, 500, 5, 500, 0.01).1 < 1e-6);
        // Zero errors on both sides does not divide by zero.
        assert!(error_rate_test(0, 100, 0, 100, 0.0).1.is_finite());
    }

    #[test]
    fn binomial_tail_matches_known_values() {
        // P(X >= 3), X ~ Bin(100, 0.01) = 0.0793732...
        assert!((binomial_upper(3, 100, 0.01) - 0.079_373_2).abs() < 1e-6);
        assert_eq!(binomial_upper(0, 10, 0.5), 1.0);
        assert!((binomial_upper(10, 10, 0.5) - 0.5_f64.powi(10)).abs() < 1e-12);
        // A large n with a small k: the first terms underflow as plain numbers.
        assert!((binomial_upper(1, 100_000, 0.01) - 1.0).abs() < 1e-9);
        // scipy.stats.binom.sf(1099, 100000, 0.01) = 0.0009117803412450804
        let p = binomial_upper(1100, 100_000, 0.01);
        assert!((p - 0.000_911_780_341_245_080_4).abs() < 1e-9, "{p}");
    }
}
