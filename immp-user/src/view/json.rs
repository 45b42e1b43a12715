//! JSON lines: one object per event, tagged with `event`.
use std::io::Write;

use immp_model::Event;

pub struct JsonView<W: Write> {
    out: W,
}

impl<W: Write> JsonView<W> {
    pub fn new(out: W) -> Self {
        Self { out }
    }
}

impl<W: Write> super::View for JsonView<W> {
    fn render(&mut self, e: &Event) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.out, e)?;
        writeln!(self.out)?;
        self.out.flush()
    }
}
