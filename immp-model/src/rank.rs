//! Ranking and IMMP verdicts: pure functions of a `Snapshot` and settings.
use serde::Serialize;

use crate::snapshot::{ProcSample, Snapshot};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RankSettings {
    /// Link bandwidth available to migration, bytes/s.
    pub bandwidth: Option<f64>,
    /// A process dirtying at least this share of the link is an IMMP.
    pub immp_share: f64,
}

impl Default for RankSettings {
    fn default() -> Self {
        Self {
            bandwidth: None,
            immp_share: 0.25,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Dirties at least `immp_share` of the link: slows pre-copy by itself.
    Immp,
    /// Dirties memory, below the IMMP threshold.
    Writer,
    Quiet,
}

impl std::fmt::Display for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Verdict::Immp => "immp",
            Verdict::Writer => "writer",
            Verdict::Quiet => "quiet",
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranked {
    #[serde(flatten)]
    pub proc_: ProcSample,
    /// Dirty rate / link bandwidth (absent without a bandwidth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_share: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
    /// Its part in the predicted migration (profile with --bandwidth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub impact: Option<crate::impact::Impact>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Ranking {
    pub processes: Vec<Ranked>,
    /// Total dirty rate / link bandwidth: at or above 1 pre-copy cannot converge.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_share: Option<f64>,
}

/// Sorted by dirty rate (highest first), then CPU, then pid for a stable order.
pub fn rank(snap: &Snapshot, s: &RankSettings) -> Ranking {
    let mut v: Vec<&ProcSample> = snap.processes.iter().collect();
    v.sort_by(|a, b| {
        b.dirty_bytes_per_s
            .total_cmp(&a.dirty_bytes_per_s)
            .then(b.cpu_pct.total_cmp(&a.cpu_pct))
            .then(a.pid.cmp(&b.pid))
    });
    let processes = v
        .into_iter()
        .map(|p| {
            let link_share = s.bandwidth.map(|bw| p.dirty_bytes_per_s / bw);
            let verdict = link_share.map(|share| {
                // immp itself is measured and shown, but it is the tool, not the suspect.
                if share >= s.immp_share && !snap.is_agent(p) {
                    Verdict::Immp
                } else if p.dirty_bytes_per_s > 0.0 {
                    Verdict::Writer
                } else {
                    Verdict::Quiet
                }
            });
            Ranked {
                proc_: p.clone(),
                link_share,
                verdict,
                impact: None,
            }
        })
        .collect();
    Ranking {
        processes,
        link_share: s.bandwidth.map(|bw| snap.totals.dirty_bytes_per_s / bw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixtures::{proc_, snap};

    #[test]
    fn sorted_by_dirty_rate_then_cpu_then_pid() {
        let s = snap(vec![
            proc_(3, 10.0, 1.0),
            proc_(1, 500.0, 5.0),
            proc_(2, 10.0, 9.0),
            proc_(4, 10.0, 9.0),
        ]);
        let r = rank(&s, &RankSettings::default());
        let order: Vec<u32> = r.processes.iter().map(|p| p.proc_.pid).collect();
        assert_eq!(order, vec![1, 2, 4, 3]);
        assert!(
            r.processes.iter().all(|p| p.verdict.is_none()),
            "no bandwidth, no verdict"
        );
    }

    #[test]
    fn verdicts_against_the_link() {
        // 12.5 MB/s link: 1000 pages/s = 4.1 MB/s = 33 % -> IMMP; 100 pages/s = 3 % -> writer.
        let s = snap(vec![
            proc_(1, 1000.0, 90.0),
            proc_(2, 100.0, 5.0),
            proc_(3, 0.0, 1.0),
        ]);
        let r = rank(
            &s,
            &RankSettings {
                bandwidth: Some(12_500_000.0),
                immp_share: 0.25,
            },
        );
        let v: Vec<_> = r.processes.iter().map(|p| p.verdict.unwrap()).collect();
        assert_eq!(v, vec![Verdict::Immp, Verdict::Writer, Verdict::Quiet]);
        let share = r.link_share.unwrap();
        assert!((share - 1100.0 * 4096.0 / 12_500_000.0).abs() < 1e-9);
    }

    /// The immp that measured is measured and shown, never called an IMMP.
    #[test]
    fn immp_itself_is_never_an_immp() {
        let mut snap = crate::fixtures::snap(vec![
            crate::fixtures::proc_(10, 3000.0, 90.0),
            crate::fixtures::proc_(11, 3000.0, 90.0),
        ]);
        snap.agent_pid = Some(11);
        let s = RankSettings {
            bandwidth: Some(12.5e6),
            ..RankSettings::default()
        };
        let r = rank(&snap, &s);
        let v = |pid| {
            r.processes
                .iter()
                .find(|p| p.proc_.pid == pid)
                .unwrap()
                .verdict
        };
        assert_eq!(v(10), Some(Verdict::Immp));
        assert_eq!(v(11), Some(Verdict::Writer));
    }
}
