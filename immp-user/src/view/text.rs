//! Text for people: each event's `Display` (names cleaned of control characters); a sample
//! table is followed by a blank line.
use std::io::Write;

use immp_model::Event;

pub struct TextView<W: Write> {
    out: W,
}

impl<W: Write> TextView<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }
}

impl<W: Write> super::View for TextView<W> {
    fn render(&mut self, e: &Event) -> std::io::Result<()> {
        match e {
            Event::Sample(s) => writeln!(self.out, "{s}")?,
            e => writeln!(self.out, "{e}")?,
        }
        self.out.flush()
    }
}
