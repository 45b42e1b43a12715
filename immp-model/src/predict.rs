//! Pre-copy migration predictor: pure, unit-tested.
//!
//! Round 0 sends the guest's non-zero memory, plus the pages first written ahead of QEMU's scan
//! while it runs; each later round resends what was dirtied during the previous round; the
//! migration stops (brief downtime) once the remainder fits the downtime limit at link speed,
//! as QEMU's stop rule does. In a round of length t each writer dirties `rate x t` distinct
//! bytes (or its measured curve), never more than its working set plus what it newly touches.
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Bytes per second available to migration.
    pub bandwidth: f64,
    /// The guest's non-zero memory, bytes: what round 0 sends of the memory as it is now (a
    /// zero page costs a few bytes).
    pub ram: f64,
    /// The guest's whole memory, bytes: the most any round can send (a writer touching zero
    /// pages grows past what round 0 sent).
    pub memory: f64,
    /// Stop-and-copy when the remainder takes at most this long.
    pub downtime_limit: Duration,
    /// Give up (not converging) after this many rounds.
    pub max_rounds: u32,
}

impl Link {
    /// Rounds after which a migration that has not converged is called non-converging.
    pub const MAX_ROUNDS: u32 = 30;

    pub fn new(bandwidth: f64, ram: f64, downtime_limit: Duration) -> Self {
        Self {
            bandwidth,
            ram,
            memory: ram,
            downtime_limit,
            max_rounds: Self::MAX_ROUNDS,
        }
    }

    /// The guest's whole memory, when known (never below round 0).
    pub fn with_memory(self, memory: f64) -> Self {
        Self {
            memory: memory.max(self.ram),
            ..self
        }
    }
}

/// The highest cap from `top` down to `floor` (whole points) for which `ok` gives a value, with
/// that value: the search both the policy and a process's `cap_to_converge` make.
pub fn highest_cap<T>(
    top: f64,
    floor: f64,
    mut ok: impl FnMut(f64) -> Option<T>,
) -> Option<(f64, T)> {
    let mut c = top;
    while c >= floor {
        if let Some(v) = ok(c) {
            return Some((c, v));
        }
        c -= 1.0;
    }
    None
}

#[derive(Debug, Clone, PartialEq)]
pub struct Writer {
    /// Dirty rate uncapped, bytes/s.
    pub rate: f64,
    /// Distinct bytes it has to dirty now (its resident set).
    pub working_set: f64,
    /// How fast that grows, bytes/s: pages it touches for the first time (a writer in its
    /// first pass over a buffer is bounded by what it will have touched, not by its RSS).
    pub growth: f64,
    /// CPU share it uses uncapped, percent of one CPU.
    pub cpu_pct: f64,
    /// Measured distinct bytes dirtied per window length (window_s, bytes), increasing windows;
    /// empty: `rate x t`.
    pub curve: Vec<(f64, f64)>,
    /// Dirty rates measured under caps: (cap percent, bytes/s), any order. Empty: a cap is
    /// assumed to slow the process in proportion (cap / cpu), which real writers often do not
    /// follow (a capped writer can lose more than its CPU share: caches, TLB, fault costs).
    pub response: Vec<(f64, f64)>,
}

impl Writer {
    pub fn linear(rate: f64, working_set: f64, cpu_pct: f64) -> Self {
        Self {
            rate,
            working_set,
            growth: 0.0,
            cpu_pct,
            curve: Vec::new(),
            response: Vec::new(),
        }
    }

    /// Its dirty rate under `cap_pct` (bytes/s): through the measured response when there is
    /// one (piecewise linear through (0, 0), the measured points made monotone, and the
    /// uncapped point), else in proportion to the CPU.
    pub fn rate_at(&self, cap_pct: Option<f64>) -> f64 {
        self.rate * self.speed(cap_pct)
    }

    /// The share of its uncapped progress a cap leaves it (0..=1).
    pub fn speed(&self, cap_pct: Option<f64>) -> f64 {
        let Some(c) = cap_pct.filter(|c| self.cpu_pct > 0.0 && *c < self.cpu_pct) else {
            return 1.0;
        };
        if self.response.is_empty() || self.rate <= 0.0 {
            return c / self.cpu_pct;
        }
        let mut pts: Vec<(f64, f64)> = self
            .response
            .iter()
            .filter(|(pc, _)| *pc < self.cpu_pct)
            .map(|&(pc, r)| (pc, (r / self.rate).min(1.0)))
            .collect();
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        pts.push((self.cpu_pct, 1.0));
        let mut prev = (0.0, 0.0);
        for (pc, f) in pts {
            let f = f.max(prev.1); // more CPU never dirties less
            if c <= pc {
                let w = if pc > prev.0 {
                    (c - prev.0) / (pc - prev.0)
                } else {
                    1.0
                };
                return prev.1 + w * (f - prev.1);
            }
            prev = (pc, f);
        }
        1.0
    }

    /// Distinct bytes dirtied in a round of `t` seconds. A cap slows the process down: in `t`
    /// it does what it would do uncapped in `t x cap / cpu` (for a streaming writer that is the
    /// rate scaled by the cap; for a rewriter of a small buffer it changes little).
    pub fn dirtied(&self, t: f64, cap_pct: Option<f64>) -> f64 {
        self.dirtied_in(t * self.speed(cap_pct))
    }

    /// Distinct bytes dirtied in `te` seconds of uncapped progress (`dirtied` once the cap's
    /// `speed` is known: the predictor computes it once per writer, not once per round).
    fn dirtied_in(&self, te: f64) -> f64 {
        let bytes = match self.curve.as_slice() {
            [] => self.rate * te,
            pts => interpolate(pts, te),
        };
        bytes.min(self.working_set + self.growth * te).max(0.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Prediction {
    pub converges: bool,
    /// Pre-copy rounds including round 0 (not counting the final stop-and-copy).
    pub rounds: u32,
    /// Total migration time, seconds (when it converges).
    pub total_s: Option<f64>,
    pub bytes_sent: f64,
    /// Stop-and-copy time, seconds (when it converges).
    pub downtime_s: Option<f64>,
}

impl Prediction {
    pub fn within(&self, target: Option<Duration>) -> bool {
        self.converges && target.is_none_or(|t| self.total_s.is_some_and(|s| s <= t.as_secs_f64()))
    }
}

/// Piecewise linear through (0, 0) and the points; beyond the last point, the last segment's
/// slope continues (a saturated curve stays flat).
fn interpolate(pts: &[(f64, f64)], t: f64) -> f64 {
    let mut prev = (0.0, 0.0);
    for &(w, b) in pts {
        if t <= w {
            let f = if w > prev.0 {
                (t - prev.0) / (w - prev.0)
            } else {
                1.0
            };
            return prev.1 + f * (b - prev.1);
        }
        prev = (w, b);
    }
    let n = pts.len();
    let slope = if n >= 2 {
        ((pts[n - 1].1 - pts[n - 2].1) / (pts[n - 1].0 - pts[n - 2].0)).max(0.0)
    } else {
        pts[0].1 / pts[0].0
    };
    prev.1 + slope * (t - prev.0)
}

/// Bytes round 0 sends. A page a writer touches for the first time during round 0 is sent as
/// data in round 0 if the scan has not reached it yet (half of them, on average: the scan and
/// the writes go through memory independently) and, being dirty, again in round 1; the model's
/// `ram` (measured before) did not hold it if its frame was zero. New pages land on free frames,
/// of which at least (memory - ram) / memory are zero: a freed frame keeps its old bytes and is
/// in `ram` already (in a guest up for long, nearly every frame). Rewritten pages add nothing.
/// `writers`: each with its `speed` under its cap.
fn round_zero(link: &Link, writers: &[(&Writer, f64)]) -> f64 {
    let room = (link.memory - link.ram).max(0.0);
    if room <= 0.0 || link.bandwidth.is_nan() || link.bandwidth <= 0.0 {
        return link.ram;
    }
    let zero_share = room / link.memory;
    // First touches in t seconds, each writer's within what it dirties at all in t.
    let new = |t: f64| -> f64 {
        writers
            .iter()
            .map(|(w, speed)| (w.growth * t * speed).min(w.dirtied_in(t * speed)))
            .filter(|b| b.is_finite())
            .sum()
    };
    // send = ram + z x new(send / B) / 2: a fixed point, approached from below; it converges
    // geometrically while the writers' new pages come slower than 2 B / z, and otherwise
    // grows to the bound (the memory), as it should: round 0 then never ends.
    let mut send = link.ram;
    for _ in 0..200 {
        let next = link.ram + (0.5 * zero_share * new(send / link.bandwidth)).min(room);
        if (next - send).abs() < 1.0 {
            return next;
        }
        send = next;
    }
    send
}

pub fn predict(link: &Link, writers: &[(Writer, Option<f64>)]) -> Prediction {
    let writers: Vec<(&Writer, f64)> = writers.iter().map(|(w, c)| (w, w.speed(*c))).collect();
    let dirtied = |t: f64| -> f64 {
        writers
            .iter()
            .map(|(w, speed)| w.dirtied_in(t * speed))
            .sum::<f64>()
            .min(link.memory)
    };
    let mut send = round_zero(link, &writers);
    let mut elapsed = 0.0;
    let mut sent = 0.0;
    for round in 1..=link.max_rounds {
        let t = send / link.bandwidth;
        elapsed += t;
        sent += send;
        let remaining = dirtied(t);
        let stop_time = remaining / link.bandwidth;
        if stop_time <= link.downtime_limit.as_secs_f64() {
            return Prediction {
                converges: true,
                rounds: round,
                total_s: Some(elapsed + stop_time),
                bytes_sent: sent + remaining,
                downtime_s: Some(stop_time),
            };
        }
        send = remaining;
    }
    Prediction {
        converges: false,
        rounds: link.max_rounds,
        total_s: None,
        bytes_sent: sent,
        downtime_s: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> Link {
        Link::new(12.5e6, 512.0 * 1048576.0, Duration::from_millis(300))
    }

    #[test]
    fn idle_guest_needs_one_round() {
        let p = predict(&link(), &[]);
        assert!(p.converges);
        assert_eq!(p.rounds, 1);
        let t = 512.0 * 1048576.0 / 12.5e6;
        assert!((p.total_s.unwrap() - t).abs() < 1e-6);
        assert_eq!(p.downtime_s, Some(0.0));
    }

    #[test]
    fn writer_faster_than_link_never_converges() {
        let w = Writer::linear(20e6, 400e6, 100.0);
        let p = predict(&link(), &[(w.clone(), None)]);
        assert!(!p.converges);
        assert_eq!(p.total_s, None);
    }

    #[test]
    fn slower_writer_converges_after_more_rounds_and_cap_helps() {
        let w = Writer::linear(6.6e6, 192.0 * 1048576.0, 100.0);
        let uncapped = predict(&link(), &[(w.clone(), None)]);
        assert!(uncapped.converges);
        assert!(uncapped.rounds > 3);
        let capped = predict(&link(), &[(w.clone(), Some(20.0))]);
        assert!(capped.converges);
        assert!(capped.total_s.unwrap() < uncapped.total_s.unwrap());
        assert!(capped.rounds < uncapped.rounds);
    }

    #[test]
    fn rewriter_bounded_by_working_set() {
        // Rewrites a 1 MB buffer at a huge rate: never more than 1 MB per round.
        let w = Writer::linear(1e9, 1e6, 100.0);
        let p = predict(&link(), &[(w.clone(), None)]);
        assert!(p.converges, "1 MB fits a 300 ms downtime at 12.5 MB/s");
        assert!(p.rounds <= 2);
    }

    #[test]
    fn curve_of_a_rewriter_saturates_and_a_cap_barely_helps_it() {
        // Rewrites a 10 MB buffer every 0.5 s: 10 MB in any window >= 0.5 s.
        let pts = vec![
            (0.1, 2e6),
            (0.25, 5e6),
            (0.5, 10e6),
            (1.0, 10e6),
            (2.0, 10e6),
            (4.0, 10e6),
        ];
        let w = Writer {
            rate: 20e6,
            working_set: 50e6,
            growth: 0.0,
            cpu_pct: 100.0,
            curve: pts,
            response: Vec::new(),
        };
        assert!((w.dirtied(0.3, None) - 6e6).abs() < 1.0);
        assert_eq!(w.dirtied(30.0, None), 10e6, "flat beyond the last window");
        assert_eq!(
            w.dirtied(4.0, Some(50.0)),
            10e6,
            "capped: 4 s act like 2 s, still 10 MB"
        );
        assert!((w.dirtied(0.5, Some(50.0)) - 5e6).abs() < 1.0);
        let streaming = Writer {
            curve: vec![(1.0, 5e6), (2.0, 10e6)],
            ..Writer::linear(5e6, 1e9, 100.0)
        };
        assert!(
            (streaming.dirtied(10.0, None) - 50e6).abs() < 1.0,
            "linear continuation"
        );
    }

    /// Round 0 sends only the non-zero memory, but a writer touching zero pages can resend
    /// more than that in a later round: the bound is the guest's whole memory.
    #[test]
    fn later_rounds_are_bounded_by_memory_not_by_round_zero() {
        let small = Link::new(10e6, 20e6, Duration::from_millis(300));
        let w = Writer {
            growth: 30e6,
            ..Writer::linear(30e6, 1e6, 100.0)
        };
        let p = predict(&small.with_memory(1e9), &[(w.clone(), None)]);
        assert!(
            !p.converges,
            "30 MB/s of new pages on a 10 MB/s link: {p:?}"
        );
        let clamped = predict(&small, &[(w, None)]);
        assert!(clamped.bytes_sent > 20e6);
        assert_eq!(small.with_memory(1e6).memory, 20e6, "never below round 0");
    }

    /// A first pass over a large buffer: 20 MB resident now, every write a new page. Its
    /// round is bounded by what it will have touched by then, not by today's RSS.
    #[test]
    fn a_growing_writer_is_not_bounded_by_its_resident_set() {
        let w = Writer {
            growth: 10e6,
            ..Writer::linear(10e6, 20e6, 100.0)
        };
        assert_eq!(w.dirtied(5.0, None), 50e6);
        let rewriter = Writer::linear(10e6, 20e6, 100.0);
        assert_eq!(rewriter.dirtied(5.0, None), 20e6);
        assert_eq!(
            w.dirtied(5.0, Some(50.0)),
            25e6,
            "a cap slows the growth too"
        );
    }

    /// A streamer's first touches ahead of the scan are sent in round 0 too, as far as they
    /// land on zero frames: 100 MB non-zero of 1 GB (0.9 zero), 5 MB/s of new pages on a
    /// 12.5 MB/s link: round 0 sends 100 / (1 - 0.9 x 2.5 / 12.5) = 121.95 MB, and `predict`
    /// takes that much longer. Rewrites add nothing; in a guest whose frames all hold data
    /// (long up) new pages add nearly nothing either.
    fn r0_of(link: &Link, writers: &[(Writer, Option<f64>)]) -> f64 {
        let ws: Vec<(&Writer, f64)> = writers.iter().map(|(w, c)| (w, w.speed(*c))).collect();
        round_zero(link, &ws)
    }

    #[test]
    fn first_touches_ahead_of_the_scan_lengthen_round_zero() {
        let l = Link::new(12.5e6, 100e6, Duration::from_millis(300)).with_memory(1e9);
        let streamer = Writer {
            growth: 5e6,
            ..Writer::linear(5e6, 1e9, 100.0)
        };
        let r0 = r0_of(&l, &[(streamer.clone(), None)]);
        assert!((r0 - 100e6 / (1.0 - 0.9 * 2.5 / 12.5)).abs() < 1e3, "{r0}");
        let capped = r0_of(&l, &[(streamer.clone(), Some(50.0))]);
        assert!(
            (capped - 100e6 / (1.0 - 0.9 * 1.25 / 12.5)).abs() < 1e3,
            "{capped}"
        );
        // The same rate rewriting pages that are non-zero already (no growth).
        let rewriter = Writer::linear(5e6, 1e9, 100.0);
        assert_eq!(r0_of(&l, &[(rewriter.clone(), None)]), 100e6);
        let (p_new, p_old) = (
            predict(&l, &[(streamer, None)]),
            predict(&l, &[(rewriter, None)]),
        );
        let extra = p_new.total_s.unwrap() - p_old.total_s.unwrap();
        assert!(
            extra > 21.9e6 / 12.5e6,
            "round 0 alone is 1.75 s longer: {extra}"
        );
        // New pages within what the writer dirties at all: a curve flat at 2 MB.
        let bounded = Writer {
            growth: 5e6,
            curve: vec![(0.5, 2e6), (1.0, 2e6)],
            ..Writer::linear(5e6, 1e9, 100.0)
        };
        let r0 = r0_of(&l, &[(bounded, None)]);
        assert!((r0 - 100.9e6).abs() < 1e3, "{r0}");
        // A guest up for long: 950 MB of 1 GB hold data; the allocator recycles them.
        let old = Link::new(12.5e6, 950e6, Duration::from_millis(300)).with_memory(1e9);
        let streamer = Writer {
            growth: 5e6,
            ..Writer::linear(5e6, 1e9, 100.0)
        };
        let r0 = r0_of(&old, &[(streamer, None)]);
        assert!(r0 < 960e6, "{r0}");
        // New pages faster than the link can ever send: round 0 grows to the memory.
        let tight = l.with_memory(110e6);
        let fast = Writer {
            growth: 50e6,
            ..Writer::linear(50e6, 1e9, 100.0)
        };
        let r0 = r0_of(&tight, &[(fast, None)]);
        assert!(r0 > 100e6 && r0 <= 110e6, "no more than memory: {r0}");
    }

    #[test]
    fn a_measured_response_replaces_proportionality() {
        // Uncapped 20 MB/s at 80 % CPU; measured 4 MB/s under a 24 % cap (proportional: 6).
        let mut w = Writer::linear(20e6, 1e9, 80.0);
        assert!((w.rate_at(Some(24.0)) - 6e6).abs() < 1.0);
        w.response = vec![(24.0, 4e6)];
        assert!((w.rate_at(Some(24.0)) - 4e6).abs() < 1.0);
        assert!((w.rate_at(Some(12.0)) - 2e6).abs() < 1.0, "through (0, 0)");
        assert!(
            (w.rate_at(Some(52.0)) - 12e6).abs() < 1.0,
            "towards the uncapped point"
        );
        assert_eq!(w.rate_at(Some(90.0)), 20e6);
        // Noisy points never make a higher cap dirty less.
        w.response = vec![(30.0, 9e6), (40.0, 7e6)];
        assert!(w.rate_at(Some(40.0)) >= w.rate_at(Some(30.0)));
    }

    #[test]
    fn cap_scales_rate_only_when_it_bites() {
        let w = Writer::linear(10e6, 1e9, 50.0);
        assert_eq!(w.dirtied(1.0, None), 10e6);
        assert_eq!(w.dirtied(1.0, Some(80.0)), 10e6);
        assert_eq!(w.dirtied(1.0, Some(25.0)), 5e6);
    }
}
