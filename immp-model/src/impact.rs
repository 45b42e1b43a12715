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

/// The migration predicted from a snapshot, and each of the `top` busiest writers' part in it.
pub fn assess(snap: &Snapshot, link: &Link, target: Option<Duration>, top: usize) -> Assessment {
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
    let rest = (guest - named).max(0.0);
    let eval = |skip: Option<ProcId>, cap: Option<(ProcId, f64)>| {
        let mut v: Vec<(Writer, Option<f64>)> = writers
            .iter()
            .filter(|(id, _)| Some(*id) != skip)
            .map(|(id, w)| (w.clone(), cap.filter(|c| c.0 == *id).map(|c| c.1)))
            .collect();
        v.push((Writer::linear(rest, link.ram, 0.0), None));
        predict(link, &v)
    };
    let prediction = eval(None, None);
    let mut impacts = BTreeMap::new();
    for (id, w) in writers.iter().take(top) {
        let cap_to_converge = if prediction.within(target) {
            None
        } else {
            highest_cap(w.cpu_pct.floor(), 1.0, |c| {
                eval(None, Some((*id, c))).within(target).then_some(())
            })
            .map(|(c, ())| c)
        };
        let without_it = eval(Some(*id), None);
        impacts.insert(
            *id,
            Impact {
                without_it,
                cap_to_converge,
            },
        );
    }
    Assessment {
        prediction,
        impacts,
    }
}
