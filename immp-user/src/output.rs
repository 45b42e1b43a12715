//! Views of a snapshot for people (table) and machines (JSON lines, CSV). Views only read.
use std::io::{IsTerminal as _, Write};

use serde::Serialize;

use crate::{
    rank::{Ranked, Ranking},
    snapshot::{Health, Mode, Snapshot, Totals},
    units::{fmt_bytes, fmt_rate},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns with human units.
    Table,
    /// One JSON object per line (JSON lines).
    Json,
    /// One row per process per interval, header first.
    Csv,
}

impl Format {
    /// Table for a terminal, JSON lines for a pipe or file.
    pub fn resolve(f: Option<Format>) -> Format {
        f.unwrap_or(if std::io::stdout().is_terminal() {
            Format::Table
        } else {
            Format::Json
        })
    }
}

/// One interval as JSON: the snapshot's facts plus the ranking (top N).
#[derive(Serialize)]
pub struct IntervalJson<'a> {
    pub seq: u64,
    pub time_unix_ms: u64,
    pub interval_s: f64,
    pub mode: Mode,
    pub mode_note: &'static str,
    pub probes: crate::probes::Flavour,
    pub folio_pages_known: bool,
    pub page_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_s: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub link_share: Option<f64>,
    pub totals: &'a Totals,
    pub health: &'a Health,
    pub exact_armed: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<crate::snapshot::Verify>,
    /// Predicted pre-copy migration (with --bandwidth).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prediction: Option<crate::predict::Prediction>,
    pub processes: &'a [Ranked<'a>],
}

pub struct Printer<W: Write> {
    out: W,
    format: Format,
    top: usize,
    csv_header_done: bool,
}

impl<W: Write> Printer<W> {
    pub fn new(out: W, format: Format, top: usize) -> Self {
        Self {
            out,
            format,
            top,
            csv_header_done: false,
        }
    }

    pub fn interval(
        &mut self,
        snap: &Snapshot,
        ranking: &Ranking<'_>,
        bandwidth: Option<f64>,
    ) -> std::io::Result<()> {
        self.interval_with(snap, ranking, bandwidth, None)
    }

    pub fn interval_with(
        &mut self,
        snap: &Snapshot,
        ranking: &Ranking<'_>,
        bandwidth: Option<f64>,
        prediction: Option<crate::predict::Prediction>,
    ) -> std::io::Result<()> {
        let n = ranking.processes.len().min(self.top);
        let procs = &ranking.processes[..n];
        match self.format {
            Format::Json => {
                let j = IntervalJson {
                    seq: snap.seq,
                    time_unix_ms: snap.time_unix_ms,
                    interval_s: snap.interval_s,
                    mode: snap.mode,
                    mode_note: snap.mode.explain(),
                    probes: snap.probes,
                    folio_pages_known: snap.folio_pages_known,
                    page_size: snap.page_size,
                    bandwidth_bytes_per_s: bandwidth,
                    link_share: ranking.link_share,
                    totals: &snap.totals,
                    health: &snap.health,
                    exact_armed: snap.exact_armed,
                    verify: snap.verify,
                    prediction,
                    processes: procs,
                };
                serde_json::to_writer(&mut self.out, &j)?;
                writeln!(self.out)?;
            }
            Format::Csv => self.csv(snap, procs)?,
            Format::Table => self.table(snap, ranking, procs, bandwidth, prediction)?,
        }
        self.out.flush()
    }

    fn csv(&mut self, snap: &Snapshot, procs: &[Ranked<'_>]) -> std::io::Result<()> {
        let mut w = csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(&mut self.out);
        if !self.csv_header_done {
            w.write_record([
                "time_unix_ms",
                "seq",
                "mode",
                "pid",
                "start_time",
                "comm",
                "dirty_bytes_per_s",
                "write_new_pps",
                "write_protect_pps",
                "pagecache_pps",
                "read_pps",
                "cpu_pct",
                "rss_bytes",
                "link_share",
                "verdict",
                "gone",
                "cgroup",
            ])?;
            self.csv_header_done = true;
        }
        for r in procs {
            let p = r.proc_;
            w.write_record([
                snap.time_unix_ms.to_string(),
                snap.seq.to_string(),
                format!("{:?}", snap.mode).to_lowercase(),
                p.pid.to_string(),
                p.start_time.to_string(),
                p.comm.clone(),
                format!("{:.0}", p.dirty_bytes_per_s),
                format!("{:.1}", p.rates.write_new),
                format!("{:.1}", p.rates.write_protect),
                format!("{:.1}", p.rates.pagecache),
                format!("{:.1}", p.rates.read),
                format!("{:.1}", p.cpu_pct),
                p.rss_bytes.to_string(),
                r.link_share.map(|s| format!("{s:.4}")).unwrap_or_default(),
                r.verdict
                    .map(|v| format!("{v:?}").to_lowercase())
                    .unwrap_or_default(),
                p.gone.to_string(),
                p.cgroup.clone(),
            ])?;
        }
        w.flush()
    }

    fn table(
        &mut self,
        snap: &Snapshot,
        ranking: &Ranking<'_>,
        procs: &[Ranked<'_>],
        bandwidth: Option<f64>,
        prediction: Option<crate::predict::Prediction>,
    ) -> std::io::Result<()> {
        let o = &mut self.out;
        let link = match (bandwidth, ranking.link_share) {
            (Some(bw), Some(share)) => format!(
                " = {:.0}% of a {} link{}",
                share * 100.0,
                fmt_rate(bw),
                if share >= 1.0 && prediction.is_none() {
                    ": faster than the link"
                } else {
                    ""
                }
            ),
            _ => String::new(),
        };
        writeln!(
            o,
            "#{} {:.2}s  mode: {:?} ({})  probes: {:?}",
            snap.seq,
            snap.interval_s,
            snap.mode,
            match snap.mode {
                Mode::Bounds => "lower bound",
                Mode::Exact => "exact",
            },
            snap.probes
        )?;
        writeln!(
            o,
            "total dirty {}{}",
            fmt_rate(snap.totals.dirty_bytes_per_s),
            link
        )?;
        if let Some(p) = prediction {
            match p.total_s {
                Some(t) => writeln!(
                    o,
                    "prediction: migration converges in {t:.1}s ({} rounds, downtime {:.0}ms, {} sent)",
                    p.rounds,
                    p.downtime_s.unwrap_or(0.0) * 1e3,
                    fmt_bytes(p.bytes_sent)
                )?,
                None => writeln!(
                    o,
                    "prediction: migration does NOT converge ({} rounds tried)",
                    p.rounds
                )?,
            }
        }
        if let Some(v) = snap.verify {
            writeln!(
                o,
                "verify PID {}: counted {} pages, pagemap soft-dirty {} pages",
                v.pid, v.counted_pages, v.soft_dirty_pages
            )?;
        }
        let h = &snap.health;
        if h.map_full > 0 || h.exit_lost > 0 {
            writeln!(
                o,
                "warning: {} new processes not counted (map full, --max-procs {}), {} exits lost",
                h.map_full, h.capacity, h.exit_lost
            )?;
        }
        writeln!(
            o,
            "{:>7} {:<16} {:>11} {:>9} {:>9} {:>9} {:>9} {:>6} {:>9} {:>6} {:<7} {:>7} CGROUP",
            "PID",
            "COMM",
            "DIRTY",
            "NEW/s",
            "WP/s",
            "PCACHE/s",
            "READ/s",
            "CPU%",
            "RSS",
            "LINK%",
            "VERDICT",
            "CAP-OK"
        )?;
        for r in procs {
            let p = r.proc_;
            writeln!(
                o,
                "{:>7} {:<16} {:>11} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>6.1} {:>9} {:>6} {:<7} {:>7} {}",
                p.pid,
                if p.gone {
                    format!("{} (gone)", p.comm)
                } else {
                    p.comm.clone()
                },
                fmt_rate(p.dirty_bytes_per_s),
                p.rates.write_new,
                p.rates.write_protect,
                p.rates.pagecache,
                p.rates.read,
                p.cpu_pct,
                fmt_bytes(p.rss_bytes as f64),
                r.link_share
                    .map(|s| format!("{:.0}", s * 100.0))
                    .unwrap_or_else(|| "-".into()),
                r.verdict
                    .map(|v| format!("{v:?}").to_lowercase())
                    .unwrap_or_else(|| "-".into()),
                r.impact
                    .and_then(|i| i.cap_to_converge)
                    .map_or_else(|| "-".into(), |c| format!("{c:.0}%")),
                p.cgroup
            )?;
            if !p.curve.is_empty() {
                let pts: Vec<String> = p
                    .curve
                    .iter()
                    .map(|c| {
                        format!(
                            "{:.2}s {}",
                            c.window_s,
                            fmt_bytes(c.pages * snap.page_size as f64)
                        )
                    })
                    .collect();
                writeln!(
                    o,
                    "{:>7} curve (dirtied per window): {}",
                    "",
                    pts.join(", ")
                )?;
            }
        }
        writeln!(o)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rank::{
        RankSettings, rank,
        tests::{proc_, snap},
    };

    #[test]
    fn json_line_is_one_object_with_sorted_processes() {
        let s = snap(vec![proc_(7, 10.0, 1.0), proc_(8, 900.0, 80.0)]);
        let r = rank(
            &s,
            &RankSettings {
                bandwidth: Some(12_500_000.0),
                immp_share: 0.25,
            },
        );
        let mut buf = Vec::new();
        Printer::new(&mut buf, Format::Json, 10)
            .interval(&s, &r, Some(12_500_000.0))
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.lines().count(), 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["mode"], "bounds");
        assert_eq!(v["processes"][0]["pid"], 8);
        assert_eq!(v["processes"][0]["verdict"], "immp");
        assert_eq!(v["processes"][1]["verdict"], "writer");
        assert!(v["processes"][0]["rates"]["write_new"].as_f64().unwrap() > 899.0);
    }

    #[test]
    fn csv_has_one_header_and_quotes_names() {
        let mut p = proc_(1, 1.0, 1.0);
        p.comm = "a,b".into();
        let s = snap(vec![p]);
        let r = rank(&s, &RankSettings::default());
        let mut buf = Vec::new();
        let mut pr = Printer::new(&mut buf, Format::Csv, 10);
        pr.interval(&s, &r, None).unwrap();
        pr.interval(&s, &r, None).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.contains("\"a,b\""));
    }

    #[test]
    fn table_names_the_mode() {
        let s = snap(vec![proc_(1, 1.0, 1.0)]);
        let r = rank(&s, &RankSettings::default());
        let mut buf = Vec::new();
        Printer::new(&mut buf, Format::Table, 10)
            .interval(&s, &r, None)
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.contains("mode: Bounds (lower bound)"), "{text}");
    }
}
