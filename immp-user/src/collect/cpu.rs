//! CPU share per process between two looks, from /proc clock ticks.
use std::{collections::HashMap, time::Instant};

use immp_model::ProcId;

/// Remembers each process's CPU ticks at the last look.
#[derive(Debug, Default)]
pub struct CpuMeter {
    last: HashMap<ProcId, (u64, Instant)>,
}

impl CpuMeter {
    /// Percent of one CPU used by `id` since the last call for it (`None` the first time).
    pub fn update(&mut self, id: ProcId, ticks: u64, at: Instant, ticks_per_s: f64) -> Option<f64> {
        let (t, before) = self.last.insert(id, (ticks, at))?;
        let secs = at.duration_since(before).as_secs_f64().max(1e-3);
        Some(ticks.saturating_sub(t) as f64 / ticks_per_s / secs * 100.0)
    }

    /// Reads /proc now; `None` the first time or when `id` no longer exists.
    pub fn pct(&mut self, id: ProcId) -> Option<f64> {
        let st = super::procfs::stat(id.pid).filter(|s| s.id == id)?;
        let tps = super::procfs::ticks_per_second() as f64;
        self.update(id, st.cpu_ticks, Instant::now(), tps)
    }

    /// Forgets processes not in `keep`.
    pub fn retain(&mut self, keep: impl Fn(&ProcId) -> bool) {
        self.last.retain(|id, _| keep(id));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn share_between_two_looks() {
        let mut m = CpuMeter::default();
        let id = ProcId::new(7, 1);
        let t0 = Instant::now();
        assert_eq!(m.update(id, 100, t0, 100.0), None);
        let pct = m
            .update(id, 150, t0 + Duration::from_secs(1), 100.0)
            .unwrap();
        assert!((pct - 50.0).abs() < 1e-9);
        m.retain(|_| false);
        assert_eq!(m.update(id, 200, t0 + Duration::from_secs(2), 100.0), None);
    }
}
