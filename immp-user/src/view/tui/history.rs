//! What the screen remembers of past intervals: the guest's total dirty rate, each writer's,
//! and the caps in force, on one time axis (one slot per snapshot), in fixed-size rings.
//!
//! Only processes that dirtied memory or were capped get a series (an idle guest of 500
//! processes costs nothing), and a series nobody wrote to for a whole ring is dropped.
use std::collections::{BTreeMap, HashMap, VecDeque};

use immp_model::{ProcId, Snapshot};

/// Snapshots kept: 10 minutes at 1 Hz (f32 values: 2.4 KB per series).
pub const SLOTS: usize = 600;

/// One process's rate and cap per slot, ending at slot `last`.
#[derive(Debug, Clone, Default)]
struct Series {
    /// Index (in `History::n` numbering) of the newest value.
    last: u64,
    dirty: VecDeque<f32>,
    /// Cap in force at each slot (0: none).
    cap: VecDeque<f32>,
}

impl Series {
    fn push(&mut self, at: u64, dirty: f32, cap: f32) {
        // Slots it was absent from (no activity): zero, uncapped. A new series needs no
        // padding: traces are aligned from their newest slot.
        if !self.dirty.is_empty() {
            let gap = at.saturating_sub(self.last + 1).min(SLOTS as u64) as usize;
            self.dirty.extend(std::iter::repeat_n(0.0, gap));
            self.cap.extend(std::iter::repeat_n(0.0, gap));
        }
        self.dirty.push_back(dirty);
        self.cap.push_back(cap);
        while self.dirty.len() > SLOTS {
            self.dirty.pop_front();
            self.cap.pop_front();
        }
        self.last = at;
    }
}

#[derive(Debug, Clone, Default)]
pub struct History {
    /// Snapshots recorded so far (the index of the next slot is `n`).
    n: u64,
    time_ms: VecDeque<u64>,
    total: VecDeque<f32>,
    link: VecDeque<f32>,
    caps: VecDeque<u8>,
    procs: HashMap<ProcId, Series>,
}

/// A process's dirty rate and cap over the slots the history holds, oldest first.
pub struct Trace {
    pub dirty: Vec<f32>,
    pub cap: Vec<f32>,
}

impl History {
    /// Records one snapshot: `caps` are the caps in force (percent), `bandwidth` the link's.
    pub fn push(&mut self, snap: &Snapshot, caps: &BTreeMap<ProcId, f64>, bandwidth: Option<f64>) {
        let at = self.n;
        self.n += 1;
        push_ring(&mut self.time_ms, snap.time_unix_ms);
        push_ring(&mut self.total, snap.totals.dirty_bytes_per_s as f32);
        push_ring(&mut self.link, bandwidth.unwrap_or(0.0) as f32);
        push_ring(&mut self.caps, caps.len().min(255) as u8);
        for p in &snap.processes {
            let cap = caps.get(&p.id()).copied().unwrap_or(0.0) as f32;
            if p.dirty_bytes_per_s > 0.0 || cap > 0.0 || self.procs.contains_key(&p.id()) {
                let s = self.procs.entry(p.id()).or_default();
                s.push(at, p.dirty_bytes_per_s as f32, cap);
            }
        }
        // A capped process missing from the snapshot still shows its cap on the axis.
        for (id, cap) in caps {
            if !snap.processes.iter().any(|p| p.id() == *id) {
                self.procs
                    .entry(*id)
                    .or_default()
                    .push(at, 0.0, *cap as f32);
            }
        }
        self.procs.retain(|_, s| {
            s.last + SLOTS as u64 > at && s.dirty.iter().chain(&s.cap).any(|v| *v > 0.0)
        });
    }

    pub fn len(&self) -> usize {
        self.total.len()
    }

    pub fn is_empty(&self) -> bool {
        self.total.is_empty()
    }

    /// Seconds the history covers (first to last snapshot, plus one interval's worth).
    pub fn span_s(&self) -> f64 {
        match (self.time_ms.front(), self.time_ms.back()) {
            (Some(a), Some(b)) if self.len() > 1 => {
                let per = (b - a) as f64 / (self.len() - 1) as f64;
                (b - a) as f64 / 1000.0 + per / 1000.0
            }
            _ => 0.0,
        }
    }

    pub fn total(&self) -> Vec<f32> {
        self.total.iter().copied().collect()
    }

    pub fn link(&self) -> Vec<f32> {
        self.link.iter().copied().collect()
    }

    pub fn caps(&self) -> Vec<u8> {
        self.caps.iter().copied().collect()
    }

    /// `id`'s trace aligned with `total()` (zeros where it did not dirty).
    pub fn trace(&self, id: &ProcId) -> Option<Trace> {
        let s = self.procs.get(id)?;
        let len = self.len();
        let behind = (self.n - 1 - s.last) as usize;
        let mut dirty = vec![0.0; len];
        let mut cap = vec![0.0; len];
        // The series' newest value sits `behind` slots before the newest slot.
        let end = len.saturating_sub(behind);
        let k = s.dirty.len().min(end);
        for i in 0..k {
            dirty[end - k + i] = s.dirty[s.dirty.len() - k + i];
            cap[end - k + i] = s.cap[s.cap.len() - k + i];
        }
        Some(Trace { dirty, cap })
    }

    /// Snapshots in which `id` dirtied memory.
    pub fn active_slots(&self, id: &ProcId) -> usize {
        self.procs
            .get(id)
            .map_or(0, |s| s.dirty.iter().filter(|v| **v > 0.0).count())
    }

    /// The highest rate `id` dirtied at in the history (0 when none was recorded).
    pub fn peak(&self, id: &ProcId) -> f32 {
        self.procs
            .get(id)
            .map_or(0.0, |s| s.dirty.iter().copied().fold(0.0, f32::max))
    }
}

fn push_ring<T>(q: &mut VecDeque<T>, v: T) {
    if q.len() == SLOTS {
        q.pop_front();
    }
    q.push_back(v);
}

#[cfg(test)]
mod tests {
    use immp_model::fixtures::{proc_, snap};

    use super::*;

    #[test]
    fn traces_align_on_one_axis_and_gaps_are_zero() {
        let mut h = History::default();
        let a = proc_(1, 100.0, 10.0);
        let id = a.id();
        h.push(&snap(vec![]), &BTreeMap::new(), None);
        h.push(&snap(vec![a.clone()]), &BTreeMap::new(), None);
        h.push(&snap(vec![]), &BTreeMap::new(), None);
        let caps = BTreeMap::from([(id, 20.0)]);
        h.push(&snap(vec![a]), &caps, None);
        let t = h.trace(&id).unwrap();
        assert_eq!(t.dirty, vec![0.0, 409600.0, 0.0, 409600.0]);
        assert_eq!(t.cap, vec![0.0, 0.0, 0.0, 20.0]);
        assert_eq!(h.caps(), vec![0, 0, 0, 1]);
        assert_eq!(h.total().len(), 4);
    }

    #[test]
    fn rings_are_bounded_and_idle_series_dropped() {
        let mut h = History::default();
        let a = proc_(1, 100.0, 10.0);
        h.push(&snap(vec![a.clone()]), &BTreeMap::new(), None);
        for _ in 0..SLOTS + 5 {
            h.push(&snap(vec![]), &BTreeMap::new(), None);
        }
        assert_eq!(h.len(), SLOTS);
        assert!(h.trace(&a.id()).is_none(), "a whole ring without dirtying");
    }
}
