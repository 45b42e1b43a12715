//! Views: render the event stream. Each `View` gets every `Event` a command emits and only
//! reads it. A new view (the TUI, a Prometheus exporter) is one more implementation.
use std::io::{IsTerminal as _, Write};

use immp_model::Event;

pub mod csv;
pub mod doctor;
pub mod json;
pub mod metrics;
pub mod text;
pub mod tui;

/// Output formats (one enum for every command; a command that prints no rows refuses CSV).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

pub trait View {
    /// Renders one event. An error is the output's (e.g. a closed pipe): the caller decides.
    fn render(&mut self, e: &Event) -> std::io::Result<()>;
}

/// The view for a format, writing to `out`.
pub fn for_format<'a, W: Write + 'a>(f: Format, out: W) -> Box<dyn View + 'a> {
    match f {
        Format::Table => Box::new(text::TextView::new(out)),
        Format::Json => Box::new(json::JsonView::new(out)),
        Format::Csv => Box::new(csv::CsvView::new(out)),
    }
}

/// True for the error a closed reader gives (`immp ... | head`): a normal end, not a failure.
pub fn is_broken_pipe(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::BrokenPipe
}

#[cfg(test)]
mod tests {
    use immp_model::{
        Event,
        event::Sample,
        fixtures::{proc_, snap},
        rank::{RankSettings, rank},
        snapshot::Snapshot,
    };

    use super::*;

    fn sample(s: &Snapshot, bandwidth: Option<f64>) -> Event {
        let r = rank(
            s,
            &RankSettings {
                bandwidth,
                immp_share: 0.25,
            },
        );
        Event::Sample(Box::new(Sample::new(s, r, bandwidth, None, 10)))
    }

    fn render(f: Format, events: &[Event]) -> String {
        let mut buf = Vec::new();
        {
            let mut v = for_format(f, &mut buf);
            for e in events {
                v.render(e).unwrap();
            }
        }
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn json_line_is_one_object_with_sorted_processes() {
        let s = snap(vec![proc_(7, 10.0, 1.0), proc_(8, 900.0, 80.0)]);
        let text = render(Format::Json, &[sample(&s, Some(12_500_000.0))]);
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
        let e = sample(&snap(vec![p]), Some(1e6));
        let text = render(Format::Csv, &[e.clone(), e]);
        assert_eq!(text.lines().count(), 3);
        assert!(text.contains("\"a,b\""));
        assert!(text.lines().nth(1).unwrap().contains(",bounds,"), "{text}");
        assert!(text.contains(",writer,"), "verdict as in JSON: {text}");
    }

    #[test]
    fn table_names_the_mode_as_json_does() {
        let text = render(
            Format::Table,
            &[sample(&snap(vec![proc_(1, 1.0, 1.0)]), None)],
        );
        assert!(text.contains("mode: bounds (lower bound)"), "{text}");
        assert!(text.ends_with("\n\n"), "a blank line after each table");
    }
}
