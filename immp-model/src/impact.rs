//! What each writer does to the predicted migration (`profile --bandwidth`): pure.
use std::{collections::BTreeMap, time::Duration};

use serde::Serialize;

use crate::{
    policy::writer_for,
    predict::{Link, Prediction, Writer, highest_cap, predict},
    snapshot::{ProcId, Snapshot},
};

/// What one process does to the predicted migration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Impact {
    /// Share of the predicted migration due to it: the prediction without its dirtying.
    pub without_it: Prediction,
    /// Highest cap (percent of one CPU) that, applied to it alone, meets the goal; `None` when
    /// no cap is needed or none would do.
    pub cap_to_converge: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Assessment {
    pub prediction: Prediction,
    #[serde(skip)]
    pub impacts: BTreeMap<ProcId, Impact>,
}

/// The guest as `assess` sees it: each writer's measured rate (a cap assumed to slow it in
/// proportion), the rest of the guest's dirtying as one background writer.
struct Guest {
    writers: Vec<(ProcId, Writer)>,
    rest: f64,
    link: Link,
}

impl Guest {
    fn new(snap: &Snapshot, link: &Link) -> Self {
        let page = snap.page_size as f64;
        let mut writers: Vec<(ProcId, Writer)> = snap
            .processes
            .iter()
            .filter(|p| !p.gone && p.dirty_bytes_per_s > 0.0)
            .map(|p| (p.id(), writer_for(p, page)))
            .collect();
        writers.sort_by(|a, b| b.1.rate.total_cmp(&a.1.rate));
        let named: f64 = writers.iter().map(|(_, w)| w.rate).sum();
        let guest = snap
            .totals
            .dirty_bytes_per_s
            .max(snap.totals.guest_dirty_bytes_per_s);
        Self {
            writers,
            rest: (guest - named).max(0.0),
            link: *link,
        }
    }

    fn eval(&self, skip: Option<ProcId>, cap: Option<(ProcId, f64)>) -> Prediction {
        let mut v: Vec<(Writer, Option<f64>)> = self
            .writers
            .iter()
            .filter(|(id, _)| Some(*id) != skip)
            .map(|(id, w)| (w.clone(), cap.filter(|c| c.0 == *id).map(|c| c.1)))
            .collect();
        v.push((Writer::linear(self.rest, self.link.memory, 0.0), None));
        predict(&self.link, &v)
    }

    /// `id`'s part, given the prediction with every writer as it is.
    fn impact(
        &self,
        id: ProcId,
        cpu_pct: f64,
        all: &Prediction,
        target: Option<Duration>,
    ) -> Impact {
        let cap_to_converge = if all.within(target) {
            None
        } else {
            highest_cap(cpu_pct.floor(), 1.0, |c| {
                self.eval(None, Some((id, c))).within(target).then_some(())
            })
            .map(|(c, ())| c)
        };
        Impact {
            without_it: self.eval(Some(id), None),
            cap_to_converge,
        }
    }
}

/// The migration predicted from a snapshot, and each of the `top` busiest writers' part in it.
pub fn assess(snap: &Snapshot, link: &Link, target: Option<Duration>, top: usize) -> Assessment {
    let g = Guest::new(snap, link);
    let prediction = g.eval(None, None);
    let impacts = g
        .writers
        .iter()
        .take(top)
        .map(|(id, w)| (*id, g.impact(*id, w.cpu_pct, &prediction, target)))
        .collect();
    Assessment {
        prediction,
        impacts,
    }
}

/// One writer's part (what `assess` gives each of the busiest), for a view that wants only
/// the selected process's; `None` when it dirties nothing.
pub fn impact_of(
    snap: &Snapshot,
    link: &Link,
    target: Option<Duration>,
    id: ProcId,
) -> Option<Impact> {
    let g = Guest::new(snap, link);
    let cpu = g.writers.iter().find(|w| w.0 == id)?.1.cpu_pct;
    Some(g.impact(id, cpu, &g.eval(None, None), target))
}
