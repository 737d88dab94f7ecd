//! Per-second, per-cohort samples of the driver requests (and OTP deliveries) this process
//! served: counts, failures (5xx or over the client timeout), a fine latency histogram and a
//! sketch of the distinct drivers. Every `serve` and `worker` process writes them to the
//! database each second; the rollout guard merges every instance's samples of a window to
//! judge the cohorts, and the ops console charts them — no Prometheus needed.
//!
//! Recording is a short mutex-guarded update (a bucket index, a bit in the sketch).

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::domain::Cohort;

/// Length of one sample slot.
pub const SLOT_MS: i64 = 1000;

/// Latency buckets: `[0, 1 ms)`, then log-spaced edges from 1 ms to 60 s (47 steps of ×1.264),
/// then `[60 s, ∞)`.
pub const BUCKETS: usize = 49;
const LOG_STEPS: f64 = 47.0;
const TOP_MS: f64 = 60_000.0;

/// The lower edge of bucket `i` in ms (bucket 0 starts at 0).
pub fn bucket_floor_ms(i: usize) -> f64 {
    if i == 0 {
        0.0
    } else {
        TOP_MS.powf((i - 1) as f64 / LOG_STEPS)
    }
}

/// The upper edge of bucket `i` in ms (the last bucket is given twice its floor).
pub fn bucket_ceil_ms(i: usize) -> f64 {
    if i + 1 >= BUCKETS {
        TOP_MS * 2.0
    } else {
        bucket_floor_ms(i + 1)
    }
}

/// The bucket a latency of `ms` falls in.
pub fn bucket_of(ms: f64) -> usize {
    if ms.is_nan() || ms < 1.0 {
        return 0;
    }
    let i = 1 + (ms.ln() / TOP_MS.ln() * LOG_STEPS).floor() as usize;
    i.min(BUCKETS - 1)
}

/// Counts per latency bucket; merged by adding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Histogram(pub [u64; BUCKETS]);

impl Default for Histogram {
    fn default() -> Self {
        Self([0; BUCKETS])
    }
}

impl Histogram {
    /// Counts one latency.
    pub fn record(&mut self, ms: f64) {
        self.0[bucket_of(ms)] += 1;
    }

    /// Adds `other`'s counts.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a += b;
        }
    }

    /// Number of latencies counted.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// The `q` quantile (0..=1) in ms, by linear interpolation inside its bucket; `None`
    /// when empty.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let n = self.total();
        if n == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * n as f64;
        let mut below = 0.0;
        for (i, &c) in self.0.iter().enumerate() {
            let c = c as f64;
            if c > 0.0 && below + c >= rank {
                let (lo, hi) = (bucket_floor_ms(i), bucket_ceil_ms(i));
                return Some(lo + (hi - lo) * ((rank - below) / c).clamp(0.0, 1.0));
            }
            below += c;
        }
        Some(bucket_floor_ms(BUCKETS - 1))
    }

    /// How many latencies exceed `ms` (the bucket holding `ms` counted in proportion).
    pub fn above(&self, ms: f64) -> f64 {
        self.0
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                let (lo, hi) = (bucket_floor_ms(i), bucket_ceil_ms(i));
                if lo >= ms {
                    c as f64
                } else if hi <= ms {
                    0.0
                } else {
                    c as f64 * (hi - ms) / (hi - lo)
                }
            })
            .sum()
    }

    /// Sparse text form, `"index:count,…"` (what the database stores).
    pub fn encode(&self) -> String {
        self.0
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| format!("{i}:{c}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Parses [`Histogram::encode`]'s form; malformed parts are skipped.
    pub fn decode(text: &str) -> Self {
        let mut h = Self::default();
        for part in text.split(',') {
            if let Some((i, c)) = part.split_once(':')
                && let (Ok(i), Ok(c)) = (i.parse::<usize>(), c.parse::<u64>())
                && i < BUCKETS
            {
                h.0[i] += c;
            }
        }
        h
    }
}

/// Bits of a [`DriverSketch`].
const SKETCH_BITS: usize = 4096;

/// Distinct drivers, approximately: a linear-counting bitmap (one bit per hashed driver
/// id), merged by OR; accurate to a few percent up to a few thousand drivers per window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverSketch(Vec<u64>);

impl Default for DriverSketch {
    fn default() -> Self {
        Self(vec![0; SKETCH_BITS / 64])
    }
}

impl DriverSketch {
    /// Adds a driver.
    pub fn add(&mut self, driver_id: &str) {
        // A seed of its own, so the sketch's bits do not line up with the cohort buckets;
        // reading from an in-memory slice cannot fail.
        let hash = murmur3::murmur3_32(&mut std::io::Cursor::new(driver_id.as_bytes()), 0x5eed).unwrap_or(0);
        let bit = hash as usize % SKETCH_BITS;
        self.0[bit / 64] |= 1 << (bit % 64);
    }

    /// ORs `other` in.
    pub fn merge(&mut self, other: &DriverSketch) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a |= b;
        }
    }

    /// Whether too many bits are set for the estimate to be trusted (more than ~10,000
    /// distinct drivers).
    pub fn saturated(&self) -> bool {
        let set: u32 = self.0.iter().map(|w| w.count_ones()).sum();
        f64::from(set) > SKETCH_BITS as f64 * 0.9
    }

    /// Estimated distinct drivers.
    pub fn estimate(&self) -> f64 {
        let m = SKETCH_BITS as f64;
        let zeros = m - self.0.iter().map(|w| w.count_ones() as f64).sum::<f64>();
        if zeros < 1.0 {
            return m * m.ln();
        }
        m * (m / zeros).ln()
    }

    /// The estimate's variance (linear counting, Whang et al. 1990: `m·(e^t − t − 1)` at
    /// a load `t` of drivers per bit).
    pub fn variance(&self) -> f64 {
        let m = SKETCH_BITS as f64;
        let t = self.estimate() / m;
        m * (t.exp() - t - 1.0)
    }

    /// Hex text form (what the database stores).
    pub fn encode(&self) -> String {
        self.0.iter().map(|w| format!("{w:016x}")).collect()
    }

    /// Parses [`DriverSketch::encode`]'s form (a malformed one counts as empty).
    pub fn decode(text: &str) -> Self {
        let words: Option<Vec<u64>> = (0..SKETCH_BITS / 64)
            .map(|i| {
                text.get(i * 16..i * 16 + 16)
                    .and_then(|w| u64::from_str_radix(w, 16).ok())
            })
            .collect();
        words.map(Self).unwrap_or_default()
    }
}

/// One cohort's requests (and OTP deliveries) in one slot, or merged over a window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CohortSample {
    /// Requests that reached this cohort.
    pub requests: u64,
    /// 5xx answers.
    pub errors: u64,
    /// Answers slower than the client timeout.
    pub timeouts: u64,
    /// Requests that were a 5xx or a timeout (each counted once).
    pub failures: u64,
    /// Request latencies.
    pub latency: Histogram,
    /// Distinct drivers.
    pub drivers: DriverSketch,
    /// OTP delivery times (accept to provider).
    pub otp: Histogram,
}

impl CohortSample {
    /// Adds `other`.
    pub fn merge(&mut self, other: &CohortSample) {
        self.requests += other.requests;
        self.errors += other.errors;
        self.timeouts += other.timeouts;
        self.failures += other.failures;
        self.latency.merge(&other.latency);
        self.drivers.merge(&other.drivers);
        self.otp.merge(&other.otp);
    }
}

/// What this process served, per slot and cohort, until written.
#[derive(Debug)]
pub struct Samples {
    client_timeout: Duration,
    slots: Mutex<BTreeMap<(i64, Cohort), CohortSample>>,
}

impl Samples {
    /// A recorder; requests slower than `client_timeout` count as timeouts.
    pub fn new(client_timeout: Duration) -> Self {
        Self {
            client_timeout,
            slots: Mutex::new(BTreeMap::new()),
        }
    }

    fn with_slot(&self, now_ms: i64, cohort: Cohort, f: impl FnOnce(&mut CohortSample)) {
        let slot = now_ms - now_ms.rem_euclid(SLOT_MS);
        let mut slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        f(slots.entry((slot, cohort)).or_default());
    }

    /// A routed driver request finished at `now_ms`.
    pub fn request(&self, now_ms: i64, cohort: Cohort, driver_id: &str, status: u16, elapsed: Duration) {
        let (error, timeout) = (status >= 500, elapsed > self.client_timeout);
        self.with_slot(now_ms, cohort, |s| {
            s.requests += 1;
            s.errors += u64::from(error);
            s.timeouts += u64::from(timeout);
            s.failures += u64::from(error || timeout);
            s.latency.record(elapsed.as_secs_f64() * 1000.0);
            s.drivers.add(driver_id);
        });
    }

    /// An OTP reached its provider `elapsed` after its accept arrived.
    pub fn otp(&self, now_ms: i64, cohort: Cohort, elapsed: Duration) {
        self.with_slot(now_ms, cohort, |s| s.otp.record(elapsed.as_secs_f64() * 1000.0));
    }

    /// Takes the slots that ended before `now_ms` (all of them with `all`), oldest first.
    pub fn take_closed(&self, now_ms: i64, all: bool) -> Vec<(i64, Cohort, CohortSample)> {
        let mut slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let current = now_ms - now_ms.rem_euclid(SLOT_MS);
        let keep = if all {
            BTreeMap::new()
        } else {
            slots.split_off(&(current, Cohort::Legacy))
        };
        let closed = std::mem::replace(&mut *slots, keep);
        closed.into_iter().map(|((slot, c), s)| (slot, c, s)).collect()
    }

    /// Puts back slots that could not be written (the database was down), merging.
    pub fn put_back(&self, rows: Vec<(i64, Cohort, CohortSample)>) {
        let mut slots = self.slots.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (slot, cohort, sample) in rows {
            slots.entry((slot, cohort)).or_default().merge(&sample);
        }
        // Bounded: keep the most recent hour.
        while slots.len() > 7200 {
            slots.pop_first();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_1ms_to_60s_finely() {
        assert_eq!(bucket_of(0.5), 0);
        assert_eq!(bucket_of(1.0), 1);
        assert_eq!(bucket_of(60_000.0), BUCKETS - 1);
        assert_eq!(bucket_of(1e9), BUCKETS - 1);
        for i in 1..BUCKETS - 1 {
            let mid = (bucket_floor_ms(i) * bucket_ceil_ms(i)).sqrt();
            assert_eq!(bucket_of(mid), i);
            assert!(bucket_ceil_ms(i) / bucket_floor_ms(i) < 1.3, "fine buckets");
        }
    }

    #[test]
    fn histogram_round_trips_and_interpolates() {
        let mut h = Histogram::default();
        for ms in 1..=100 {
            h.record(f64::from(ms));
        }
        assert_eq!(Histogram::decode(&h.encode()), h);
        let p50 = h.quantile(0.5).unwrap();
        assert!((45.0..56.0).contains(&p50), "{p50}");
        let p99 = h.quantile(0.99).unwrap();
        assert!((90.0..110.0).contains(&p99), "{p99}");
        assert!((h.above(50.0) - 50.0).abs() < 6.0);
    }

    #[test]
    fn the_sketch_counts_distinct_drivers() {
        let mut a = DriverSketch::default();
        for i in 0..1000 {
            a.add(&format!("driver-{i}"));
            a.add(&format!("driver-{i}"));
        }
        let mut b = DriverSketch::default();
        for i in 500..1500 {
            b.add(&format!("driver-{i}"));
        }
        a.merge(&b);
        let n = DriverSketch::decode(&a.encode()).estimate();
        assert!((1400.0..1600.0).contains(&n), "{n}");
    }

    #[test]
    fn closed_slots_are_taken_once() {
        let s = Samples::new(Duration::from_secs(7));
        s.request(1_500, Cohort::Legacy, "d", 200, Duration::from_millis(3));
        s.request(1_700, Cohort::AtomicAsync, "d", 500, Duration::from_secs(8));
        s.request(2_100, Cohort::Legacy, "d", 200, Duration::from_millis(3));
        let closed = s.take_closed(2_200, false);
        assert_eq!(closed.len(), 2);
        let atomic = &closed.iter().find(|c| c.1 == Cohort::AtomicAsync).unwrap().2;
        assert_eq!(
            (atomic.requests, atomic.errors, atomic.timeouts, atomic.failures),
            (1, 1, 1, 1)
        );
        assert!(s.take_closed(2_200, false).is_empty());
        assert_eq!(s.take_closed(2_200, true).len(), 1);
    }
}
