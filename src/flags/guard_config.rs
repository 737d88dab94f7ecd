//! A flag's `[name.guard]` section: the staged rollout the guard walks by itself.

/// What the guard does on a failed window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFail {
    /// An override of percent 0, fleet-wide.
    Rollback,
    /// Keep the percent.
    Hold,
}

/// `[trip_accept_v2.guard]`.
#[derive(Debug, Clone, PartialEq)]
pub struct GuardConfig {
    /// Whether the guard acts.
    pub enabled: bool,
    /// Percentages (basis points) to walk through, ascending.
    pub steps: Vec<u32>,
    /// Dwell at a step, in passing windows' time, before promoting (s).
    pub step_after_s: u64,
    /// A verdict every window, over that window's requests (s).
    pub window_s: u64,
    /// Requests per cohort per window; fewer → inconclusive.
    pub min_requests: u64,
    /// Most atomic_async's failure rate may exceed legacy's.
    pub max_error_rate_delta: f64,
    /// Most atomic_async's p99 may be, as a multiple of legacy's.
    pub max_p99_ratio: f64,
    /// Each test's confidence, before the correction for repeated looks.
    pub confidence: f64,
    /// What a failed window does.
    pub on_fail: OnFail,
}

impl Default for GuardConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            steps: vec![1000, 5000, 10_000],
            step_after_s: 600,
            window_s: 60,
            min_requests: 50,
            max_error_rate_delta: 0.01,
            max_p99_ratio: 1.2,
            confidence: 0.99,
            on_fail: OnFail::Rollback,
        }
    }
}

impl GuardConfig {
    /// Windows judged per step: the looks the per-window significance is divided over.
    pub fn looks_per_step(&self) -> u64 {
        self.step_after_s.div_ceil(self.window_s).max(1)
    }

    /// The per-test, per-window significance: `(1 − confidence)` spent over the looks of a
    /// step and the three tests (Bonferroni), so a healthy step fails by chance with
    /// probability at most `1 − confidence`.
    pub fn alpha_per_look(&self) -> f64 {
        (1.0 - self.confidence) / (3 * self.looks_per_step()) as f64
    }

    /// The first step above `threshold`, if any.
    pub fn next_step(&self, threshold: u32) -> Option<u32> {
        self.steps.iter().copied().find(|s| *s > threshold)
    }

    /// Parses and validates a `guard` table; `Err((key, reason))`.
    pub fn parse(value: &toml::Value) -> Result<Self, (String, String)> {
        let toml::Value::Table(fields) = value else {
            return Err(("guard".into(), "must be a table ([name.guard])".into()));
        };
        let bad = |key: &str, reason: &str| (format!("guard.{key}"), reason.to_owned());
        let mut g = Self::default();
        for (key, v) in fields {
            match key.as_str() {
                "enabled" => g.enabled = v.as_bool().ok_or_else(|| bad(key, "must be true or false"))?,
                "steps" => {
                    let items = v
                        .as_array()
                        .ok_or_else(|| bad(key, "must be an array of percentages"))?;
                    g.steps = items
                        .iter()
                        .map(|p| super::parse_percent(p).map_err(|r| bad(key, &r)))
                        .collect::<Result<_, _>>()?;
                }
                "step_after_s" | "window_s" | "min_requests" => {
                    // Bounded so that no arithmetic on them can overflow: the durations
                    // to 30 days, the count to a trillion.
                    let max: i64 = if key == "min_requests" {
                        1_000_000_000_000
                    } else {
                        30 * 86_400
                    };
                    let n = v
                        .as_integer()
                        .filter(|n| (1..=max).contains(n))
                        .ok_or_else(|| bad(key, &format!("must be a whole number in 1..={max}")))?
                        as u64;
                    match key.as_str() {
                        "step_after_s" => g.step_after_s = n,
                        "window_s" => g.window_s = n,
                        _ => g.min_requests = n,
                    }
                }
                "max_error_rate_delta" => {
                    g.max_error_rate_delta = number(v)
                        .filter(|d| (0.0..=1.0).contains(d))
                        .ok_or_else(|| bad(key, "must be a number in 0..=1"))?
                }
                "max_p99_ratio" => {
                    g.max_p99_ratio = number(v)
                        .filter(|r| *r >= 1.0 && r.is_finite())
                        .ok_or_else(|| bad(key, "must be a number ≥ 1"))?
                }
                "confidence" => {
                    g.confidence = number(v)
                        .filter(|c| *c >= 0.5 && *c < 1.0)
                        .ok_or_else(|| bad(key, "must be a number in 0.5..1"))?
                }
                "on_fail" => {
                    g.on_fail = match v.as_str() {
                        Some("rollback") => OnFail::Rollback,
                        Some("hold") => OnFail::Hold,
                        _ => return Err(bad(key, "must be \"rollback\" or \"hold\"")),
                    }
                }
                other => {
                    return Err(bad(
                        other,
                        "unknown key (enabled, steps, step_after_s, window_s, min_requests, max_error_rate_delta, max_p99_ratio, confidence, on_fail)",
                    ));
                }
            }
        }
        if g.steps.is_empty() || g.steps.windows(2).any(|w| w[0] >= w[1]) || g.steps[0] == 0 {
            return Err(bad("steps", "must be percentages above 0, strictly ascending"));
        }
        if g.step_after_s < g.window_s {
            return Err(bad("step_after_s", "must be at least window_s"));
        }
        Ok(g)
    }
}

fn number(v: &toml::Value) -> Option<f64> {
    match v {
        toml::Value::Integer(i) => Some(*i as f64),
        toml::Value::Float(f) => Some(*f),
        _ => None,
    }
}
