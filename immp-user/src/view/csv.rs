//! CSV: one row per process per sample, header first. Other events have no rows.
use std::io::Write;

use immp_model::{Event, event::Sample};

pub struct CsvView<W: Write> {
    out: W,
    header_done: bool,
}

const HEADER: [&str; 18] = [
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
    "shmem_pps",
    "read_pps",
    "cpu_pct",
    "rss_bytes",
    "link_share",
    "verdict",
    "gone",
    "cgroup",
];

impl<W: Write> CsvView<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            header_done: false,
        }
    }

    fn rows(&mut self, s: &Sample) -> std::io::Result<()> {
        let mut w = csv::WriterBuilder::new()
            .has_headers(false)
            .from_writer(&mut self.out);
        if !self.header_done {
            w.write_record(HEADER)?;
            self.header_done = true;
        }
        for r in &s.processes {
            let p = &r.proc_;
            w.write_record([
                s.time_unix_ms.to_string(),
                s.seq.to_string(),
                s.mode.to_string(),
                p.pid.to_string(),
                p.start_time.to_string(),
                p.comm.clone(),
                format!("{:.0}", p.dirty_bytes_per_s),
                format!("{:.1}", p.rates.write_new),
                format!("{:.1}", p.rates.write_protect),
                format!("{:.1}", p.rates.pagecache),
                format!("{:.1}", p.rates.shmem),
                format!("{:.1}", p.rates.read),
                format!("{:.1}", p.cpu_pct),
                p.rss_bytes.to_string(),
                r.link_share.map(|s| format!("{s:.4}")).unwrap_or_default(),
                r.verdict.map(|v| v.to_string()).unwrap_or_default(),
                p.gone.to_string(),
                p.cgroup.clone(),
            ])?;
        }
        w.flush()
    }
}

impl<W: Write> super::View for CsvView<W> {
    fn render(&mut self, e: &Event) -> std::io::Result<()> {
        match e {
            Event::Sample(s) => self.rows(s),
            _ => Ok(()),
        }
    }
}
