//! Pre-copy migration predictor: pure, unit-tested.
//!
//! Round 0 sends all guest RAM; each later round resends what was dirtied during the previous
//! round; migration stops (brief downtime) once the remainder fits the downtime limit at link
//! speed, as QEMU's stop rule does. Each writer dirties `rate x t` distinct bytes in a round of
//! length t, never more than its working set.
use std::time::Duration;

use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Link {
    /// Bytes per second available to migration.
    pub bandwidth: f64,
    /// Guest RAM, bytes (sent whole in round 0).
    pub ram: f64,
    /// Stop-and-copy when the remainder takes at most this long.
    pub downtime_limit: Duration,
    /// Give up (not converging) after this many rounds.
    pub max_rounds: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Writer {
    /// Dirty rate uncapped, bytes/s.
    pub rate: f64,
    /// Upper bound of distinct bytes it can dirty (its resident set).
    pub working_set: f64,
    /// CPU share it uses uncapped, percent of one CPU.
    pub cpu_pct: f64,
}

impl Writer {
    /// Dirty rate under a CPU cap: proportional to the CPU it gets (measured on real capped
    /// writers in the tests; a writer that is not CPU-bound is unaffected until the cap bites).
    pub fn rate_at(&self, cap_pct: Option<f64>) -> f64 {
        match cap_pct {
            Some(c) if self.cpu_pct > 0.0 && c < self.cpu_pct => self.rate * c / self.cpu_pct,
            _ => self.rate,
        }
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

pub fn predict(link: &Link, writers: &[(Writer, Option<f64>)]) -> Prediction {
    let dirtied = |t: f64| -> f64 {
        writers
            .iter()
            .map(|(w, cap)| (w.rate_at(*cap) * t).min(w.working_set))
            .sum::<f64>()
            .min(link.ram)
    };
    let mut send = link.ram;
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
        Link {
            bandwidth: 12.5e6,
            ram: 512.0 * 1048576.0,
            downtime_limit: Duration::from_millis(300),
            max_rounds: 30,
        }
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
        let w = Writer {
            rate: 20e6,
            working_set: 400e6,
            cpu_pct: 100.0,
        };
        let p = predict(&link(), &[(w, None)]);
        assert!(!p.converges);
        assert_eq!(p.total_s, None);
    }

    #[test]
    fn slower_writer_converges_after_more_rounds_and_cap_helps() {
        let w = Writer {
            rate: 6.6e6,
            working_set: 192.0 * 1048576.0,
            cpu_pct: 100.0,
        };
        let uncapped = predict(&link(), &[(w, None)]);
        assert!(uncapped.converges);
        assert!(uncapped.rounds > 3);
        let capped = predict(&link(), &[(w, Some(20.0))]);
        assert!(capped.converges);
        assert!(capped.total_s.unwrap() < uncapped.total_s.unwrap());
        assert!(capped.rounds < uncapped.rounds);
    }

    #[test]
    fn rewriter_bounded_by_working_set() {
        // Rewrites a 1 MB buffer at a huge rate: never more than 1 MB per round.
        let w = Writer {
            rate: 1e9,
            working_set: 1e6,
            cpu_pct: 100.0,
        };
        let p = predict(&link(), &[(w, None)]);
        assert!(p.converges, "1 MB fits a 300 ms downtime at 12.5 MB/s");
        assert!(p.rounds <= 2);
    }

    #[test]
    fn cap_scales_rate_only_when_it_bites() {
        let w = Writer {
            rate: 10e6,
            working_set: 1e9,
            cpu_pct: 50.0,
        };
        assert_eq!(w.rate_at(None), 10e6);
        assert_eq!(w.rate_at(Some(80.0)), 10e6);
        assert_eq!(w.rate_at(Some(25.0)), 5e6);
    }
}
