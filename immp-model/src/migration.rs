//! Events of `immp host watch`, the host-side command that starts immp inside a guest when
//! QEMU starts migrating it and stops it when the migration ends. They are part of the one
//! `Event` stream (JSON from the serde tags, text from `Display`), like every other command's.
use std::fmt::{self, Display, Formatter};

use serde::Serialize;

use crate::{text::clean, units::fmt_rate};

/// Which guest agent a command went through: the guest runs on the source until a migration
/// completes, on the destination after.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    Source,
    Destination,
}

impl Display for Side {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// Both sockets answered; the watcher waits for a migration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Watching {
    pub qmp: String,
    pub qga: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dest_qga: Option<String>,
    /// QEMU's version (QMP greeting) and the guest agent's (`guest-info`).
    pub qemu_version: String,
    pub agent_version: String,
    /// What `immp --version` printed in the guest.
    pub guest_immp: String,
    /// The migration's status when the watch started (`none` if there never was one).
    pub status: String,
}

impl Display for Watching {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "watching {} (QEMU {}, migration {}); guest agent {} (qemu-ga {}), {} in the guest",
            clean(&self.qmp),
            clean(&self.qemu_version),
            clean(&self.status),
            clean(&self.qga),
            clean(&self.agent_version),
            clean(&self.guest_immp)
        )?;
        if let Some(d) = &self.dest_qga {
            write!(f, "; destination agent {}", clean(d))?;
        }
        Ok(())
    }
}

/// The migration's status changed (a QMP `MIGRATION` event, or `query-migrate`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MigrationStatus {
    pub status: String,
    /// `max-bandwidth` in force (bytes/s), read when the migration becomes active.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bandwidth_bytes_per_s: Option<f64>,
    /// From `query-migrate` once it ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_time_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transferred_bytes: Option<u64>,
}

impl Display for MigrationStatus {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(f, "migration {}", clean(&self.status))?;
        if let Some(b) = self.max_bandwidth_bytes_per_s {
            write!(f, ", max-bandwidth {}", fmt_rate(b))?;
        }
        if let Some(t) = self.total_time_ms {
            write!(f, ", {:.1}s", t as f64 / 1e3)?;
        }
        if let Some(d) = self.downtime_ms {
            write!(f, ", downtime {d} ms")?;
        }
        if let Some(b) = self.transferred_bytes {
            write!(f, ", {:.0} MB sent", b as f64 / 1e6)?;
        }
        Ok(())
    }
}

/// immp started inside the guest (`guest-exec`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuestStarted {
    /// The guest's PID of immp.
    pub pid: i64,
    pub argv: Vec<String>,
    pub via: Side,
}

impl Display for GuestStarted {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest: started `{}` (guest PID {}, through the {} agent)",
            clean(&self.argv.join(" ")),
            self.pid,
            self.via
        )
    }
}

/// One cap the guest's immp set, from its own JSON output.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuestCap {
    pub pid: u32,
    pub comm: String,
    /// Every cap it held, in order (the policy tightens and loosens).
    pub caps_pct: Vec<f64>,
    /// Its cap was lifted (`lifted`) or released when it exited (`gone`).
    pub lifted: bool,
}

/// immp stopped inside the guest: how, its exit, and what its output says it undid.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GuestStopped {
    pub pid: i64,
    pub via: Side,
    /// `sigterm`, `sigkill` (it did not stop in time), or `exited` (on its own).
    pub how: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exitcode: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signal: Option<i64>,
    pub caps: Vec<GuestCap>,
    /// `immp restore` run after an unclean exit: its exit code and output.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub restore: Option<String>,
    /// Its last error line (stderr), if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The guest agent truncated its output (16 MB): the caps list may be incomplete.
    pub output_truncated: bool,
    /// Every cap lifted: immp exited 0 (or `immp restore` succeeded) and its output lists a
    /// lift for every process it capped.
    pub clean: bool,
}

impl Display for GuestStopped {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "guest: immp (guest PID {}) stopped ({}, through the {} agent): ",
            self.pid, self.how, self.via
        )?;
        match (self.exitcode, self.signal) {
            (Some(c), _) => write!(f, "exit {c}")?,
            (None, Some(s)) => write!(f, "killed by signal {s}")?,
            _ => f.write_str("exit unknown")?,
        }
        let caps: Vec<f64> = self.caps.iter().flat_map(|c| c.caps_pct.clone()).collect();
        let (lo, hi) = caps
            .iter()
            .fold((f64::MAX, 0.0f64), |(lo, hi), &c| (lo.min(c), hi.max(c)));
        match self.caps.len() {
            0 => f.write_str("; it capped nothing")?,
            n => write!(
                f,
                "; {n} process{} capped ({lo:.1}-{hi:.1}%), {} lifted",
                if n == 1 { "" } else { "es" },
                self.caps.iter().filter(|c| c.lifted).count()
            )?,
        }
        if let Some(r) = &self.restore {
            write!(f, "; immp restore: {}", clean(r))?;
        }
        if let Some(e) = &self.error {
            write!(f, "; its error: {}", clean(e))?;
        }
        f.write_str(if self.clean {
            "; every cap lifted"
        } else {
            "; caps NOT confirmed lifted"
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stopped_line_says_what_was_undone() {
        let s = GuestStopped {
            pid: 42,
            via: Side::Destination,
            how: "sigterm".into(),
            exitcode: Some(0),
            signal: None,
            caps: vec![GuestCap {
                pid: 7,
                comm: "writer".into(),
                caps_pct: vec![15.0, 10.5],
                lifted: true,
            }],
            restore: None,
            error: None,
            output_truncated: false,
            clean: true,
        };
        assert_eq!(
            s.to_string(),
            "guest: immp (guest PID 42) stopped (sigterm, through the destination agent): exit 0; \
1 process capped (10.5-15.0%), 1 lifted; every cap lifted"
        );
    }
}
