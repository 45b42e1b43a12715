//! `immp doctor` as a table for people: check, status, detail, consequence. Long details wrap
//! inside their column so the next column stays aligned.
use std::io::Write;

use immp_model::text::clean;

use crate::collect::checks::{Report, Status};

const DETAIL: usize = 60;

impl Status {
    pub fn word(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        }
    }
}

/// Splits `s` into lines of at most `width` characters, at spaces where possible.
fn wrap(s: &str, width: usize) -> Vec<String> {
    let mut lines = vec![String::new()];
    for word in s.split(' ') {
        let mut word: Vec<char> = word.chars().collect();
        loop {
            let cur = lines.last_mut().expect("one line");
            let len = cur.chars().count();
            let sep = usize::from(len > 0);
            if len + sep + word.len() <= width {
                if sep == 1 {
                    cur.push(' ');
                }
                cur.extend(word.iter());
                break;
            }
            if len > 0 {
                lines.push(String::new());
                continue;
            }
            // A word longer than the column: cut it.
            cur.extend(word.drain(..width));
            lines.push(String::new());
        }
    }
    lines.retain(|l| !l.is_empty());
    if lines.is_empty() {
        lines.push(String::new());
    }
    lines
}

pub fn print(r: &Report, out: &mut impl Write) -> std::io::Result<()> {
    writeln!(out, "immp doctor: kernel {}", clean(&r.kernel))?;
    writeln!(
        out,
        "{:<18} {:<6} {:<DETAIL$} WHAT IMMP DOES",
        "CHECK", "STATUS", "DETAIL"
    )?;
    for c in &r.checks {
        let detail = wrap(&clean(&c.detail), DETAIL);
        for (i, d) in detail.iter().enumerate() {
            if i == 0 {
                writeln!(
                    out,
                    "{:<18} {:<6} {d:<DETAIL$} {}",
                    c.name,
                    c.status.word(),
                    clean(&c.consequence)
                )?;
            } else {
                writeln!(out, "{:<18} {:<6} {d}", "", "")?;
            }
        }
    }
    let verdict = if r.usable {
        "immp can work here."
    } else {
        "immp cannot work here (see FAIL rows)."
    };
    writeln!(out, "{verdict}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::checks::Check;

    #[test]
    fn long_details_wrap_inside_their_column() {
        let long = "x ".repeat(50) + &"y".repeat(90);
        let r = Report {
            kernel: "6.1".into(),
            checks: vec![Check {
                name: "btf",
                status: Status::Warn,
                detail: long,
                consequence: "falls back".into(),
            }],
            usable: true,
        };
        let mut buf = Vec::new();
        print(&r, &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert!(
            lines[1].starts_with("CHECK") && lines[1].contains("STATUS"),
            "{text}"
        );
        let consequence_at = lines[1].find("WHAT IMMP DOES").unwrap();
        assert_eq!(lines[2].find("falls back"), Some(consequence_at), "{text}");
        assert!(
            lines
                .iter()
                .all(|l| l.chars().count() <= consequence_at + 40),
            "{text}"
        );
        assert!(lines.len() > 4, "the detail wrapped: {text}");
    }
}
