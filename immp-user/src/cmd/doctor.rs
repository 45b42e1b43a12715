//! `immp doctor`: what this kernel and machine allow, and what immp will do with it.
use std::io::Write as _;

use clap::Args;

use super::args::EventFormat;
use crate::{
    collect::checks,
    view::{Format, is_broken_pipe},
};

pub const HELP: &str = "Examples:\n  immp doctor\n  immp doctor --format json\n\n\
Exits non-zero only when immp cannot work at all.";

#[derive(Args, Debug, Clone)]
pub struct DoctorArgs {
    /// Output format (default: table on a terminal, json otherwise)
    #[arg(long, value_enum)]
    pub format: Option<EventFormat>,
}

pub fn run(a: DoctorArgs) -> anyhow::Result<i32> {
    let r = checks::run();
    let mut out = std::io::stdout().lock();
    let written = match Format::resolve(a.format.map(Into::into)) {
        Format::Json => serde_json::to_writer(&mut out, &r)
            .map_err(std::io::Error::from)
            .and_then(|()| writeln!(out)),
        _ => crate::view::doctor::print(&r, &mut out),
    };
    match written {
        Err(e) if is_broken_pipe(&e) => {} // `immp doctor | head -1`: the reader had enough
        r => r?,
    }
    Ok(if r.usable {
        crate::exit::OK
    } else {
        crate::exit::ENVIRONMENT
    })
}
