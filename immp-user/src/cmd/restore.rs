//! `immp restore`: put back every process a crashed or killed immp left capped.
use anyhow::Context as _;
use clap::Args;
use immp_model::{
    Event,
    event::{Nothing, RestoreFailed, Undo},
};

use super::args::{EventFormat, JournalArgs};
use crate::{
    act::{journal::Journal, undo::restore_all},
    view::{self, Format},
};

pub const HELP: &str = "Examples:\n  immp restore\n  immp restore --journal-dir /var/lib/immp --format json\n\n\
Idempotent: running it twice is harmless. Exit 0 when everything pending was restored.";

#[derive(Args, Debug, Clone)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub journal: JournalArgs,
    /// Output format (default: table on a terminal, json otherwise)
    #[arg(long, value_enum)]
    pub format: Option<EventFormat>,
}

pub fn run(a: RestoreArgs) -> anyhow::Result<i32> {
    crate::require_root()?;
    let dir = &a.journal.journal_dir;
    if !dir.is_dir() {
        return Err(crate::usage(format!(
            "journal directory {} does not exist (nothing was changed; see --journal-dir)",
            dir.display()
        )));
    }
    let mut out = view::for_format(Format::resolve(a.format.map(Into::into)), std::io::stdout());
    let mut j = Journal::open(&a.journal.journal_dir).context("opening the journal")?;
    let done = restore_all(&mut j)?;
    if done.is_empty() {
        let journal = j.path().display().to_string();
        let _ = out.render(&Event::Nothing(Nothing { journal }));
    }
    let mut failed = false;
    for (p, r) in done {
        failed |= r.is_err();
        let _ = out.render(&undo_event(&p, r, Event::Restored));
    }
    Ok(if failed {
        crate::exit::FAILURE
    } else {
        crate::exit::OK
    })
}

/// The event for one undone placement: `ok` on success, `restore-failed` otherwise.
pub fn undo_event(
    p: &crate::act::journal::Placement,
    r: anyhow::Result<immp_model::event::Undone>,
    ok: fn(Undo) -> Event,
) -> Event {
    let (pid, start_time, comm) = (p.pid, p.start_time, p.comm.clone());
    match r {
        Ok(undone) => ok(Undo {
            pid,
            start_time,
            comm,
            undone,
        }),
        Err(e) => Event::RestoreFailed(RestoreFailed {
            pid,
            start_time,
            comm,
            error: format!("{e:#}"),
        }),
    }
}
