//! A QMP client (QEMU's monitor protocol): greeting, `qmp_capabilities`, commands, and the
//! `MIGRATION` events met on the way. Only what `immp host watch` needs, typed.
use std::{
    collections::VecDeque,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::wire::{Conn, WireError, show};

/// A command: `{"execute": NAME, "arguments": {...}}`.
#[derive(Serialize)]
pub struct Request<'a, A: Serialize> {
    pub execute: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<A>,
}

/// Anything QEMU sends: a greeting, a reply, an error or an event.
#[derive(Deserialize)]
struct Incoming {
    #[serde(rename = "QMP")]
    greeting: Option<Greeting>,
    #[serde(rename = "return")]
    ret: Option<serde_json::Value>,
    error: Option<ErrorBody>,
    event: Option<String>,
    data: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct Greeting {
    version: VersionInfo,
}

#[derive(Deserialize)]
struct VersionInfo {
    qemu: Triple,
    #[serde(default)]
    package: String,
}

#[derive(Deserialize)]
struct Triple {
    major: u32,
    minor: u32,
    micro: u32,
}

#[derive(Deserialize, Debug)]
pub struct ErrorBody {
    #[serde(default)]
    pub class: String,
    #[serde(default)]
    pub desc: String,
}

/// `MIGRATION` event data.
#[derive(Deserialize)]
struct MigrationEvent {
    status: String,
}

/// `query-migrate` (the fields the watcher reports). `{}` when no migration ever ran.
#[derive(Deserialize, Debug, Default)]
pub struct MigrateInfo {
    pub status: Option<String>,
    #[serde(rename = "total-time")]
    pub total_time: Option<u64>,
    pub downtime: Option<u64>,
    pub ram: Option<RamInfo>,
}

#[derive(Deserialize, Debug, Default)]
pub struct RamInfo {
    pub transferred: Option<u64>,
}

#[derive(Deserialize)]
struct MigrateParameters {
    #[serde(rename = "max-bandwidth")]
    max_bandwidth: Option<u64>,
}

pub struct Qmp {
    conn: Conn,
    timeout: Duration,
    pub version: String,
    /// Migration statuses from events read while waiting for a reply.
    events: VecDeque<String>,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation. Errors name the
    /// socket and say whether it is missing or speaks something else.
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let what = format!("QMP socket {}", path.display());
        let mut conn = Conn::connect(path).map_err(|e| bad_socket(&what, &e))?;
        let deadline = Instant::now() + timeout;
        let line = conn
            .read_line(deadline)
            .map_err(|e| bad_socket(&what, &e))?
            .ok_or_else(|| {
                crate::usage(format!(
                    "{what} sent no QMP greeting within {timeout:?} (a guest agent socket says nothing until asked: is it the QMP one?)"
                ))
            })?;
        let version = match serde_json::from_slice::<Incoming>(&line) {
            Ok(Incoming {
                greeting: Some(g), ..
            }) => {
                let q = g.version.qemu;
                let pkg = g.version.package.trim();
                let sep = if pkg.is_empty() { "" } else { " " };
                format!("{}.{}.{}{sep}{pkg}", q.major, q.minor, q.micro)
            }
            _ => {
                return Err(crate::usage(format!(
                    "{what} does not speak QMP: it sent {} where QEMU sends its greeting",
                    show(&line)
                )));
            }
        };
        let mut q = Self {
            conn,
            timeout,
            version,
            events: VecDeque::new(),
        };
        q.execute::<(), serde::de::IgnoredAny>("qmp_capabilities", None)
            .with_context(|| format!("{what}: capabilities negotiation"))?;
        Ok(q)
    }

    /// Runs one command and returns its typed reply; events met meanwhile are kept.
    pub fn execute<A: Serialize, R: DeserializeOwned>(
        &mut self,
        name: &str,
        arguments: Option<A>,
    ) -> anyhow::Result<R> {
        let req = Request {
            execute: name,
            arguments,
        };
        self.conn.send(&req).map_err(closed)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let line = self
                .conn
                .read_line(deadline)
                .map_err(closed)?
                .with_context(|| format!("QEMU did not answer {name} within {:?}", self.timeout))?;
            let msg: Incoming = serde_json::from_slice(&line)
                .with_context(|| format!("QMP sent {} (not JSON) to {name}", show(&line)))?;
            if self.keep_event(&msg) {
                continue;
            }
            if let Some(e) = msg.error {
                anyhow::bail!("QMP {name}: {} ({})", e.desc, e.class);
            }
            let ret = msg.ret.unwrap_or(serde_json::Value::Null);
            return serde_json::from_value(ret)
                .with_context(|| format!("QMP {name}: unexpected reply"));
        }
    }

    /// True for an event (a migration status is queued).
    fn keep_event(&mut self, msg: &Incoming) -> bool {
        let Some(name) = &msg.event else {
            return false;
        };
        if name == "MIGRATION"
            && let Some(d) = msg
                .data
                .clone()
                .and_then(|d| serde_json::from_value::<MigrationEvent>(d).ok())
        {
            self.events.push_back(d.status);
        }
        true
    }

    /// The next migration status QEMU announces (`MIGRATION` event), waiting at most `wait`.
    /// QEMU sends these only with the `events` migration capability (libvirt sets it): the
    /// watcher also polls `query-migrate`.
    pub fn next_event(&mut self, wait: Duration) -> anyhow::Result<Option<String>> {
        if let Some(s) = self.events.pop_front() {
            return Ok(Some(s));
        }
        let deadline = Instant::now() + wait;
        while let Some(line) = self.conn.read_line(deadline).map_err(closed)? {
            if let Ok(msg) = serde_json::from_slice::<Incoming>(&line) {
                self.keep_event(&msg);
            }
            if let Some(s) = self.events.pop_front() {
                return Ok(Some(s));
            }
        }
        Ok(None)
    }

    pub fn query_migrate(&mut self) -> anyhow::Result<MigrateInfo> {
        self.execute::<(), _>("query-migrate", None)
    }

    /// The migration's `max-bandwidth`, bytes/s.
    pub fn max_bandwidth(&mut self) -> anyhow::Result<Option<u64>> {
        let p: MigrateParameters = self.execute::<(), _>("query-migrate-parameters", None)?;
        Ok(p.max_bandwidth)
    }
}

/// A connection error on a socket named on the command line: bad input (exit 2).
pub fn bad_socket(what: &str, e: &WireError) -> anyhow::Error {
    match e {
        WireError::Connect(e) => crate::usage(format!("cannot connect to the {what}: {e}")),
        e => crate::usage(format!("{what}: {e}")),
    }
}

fn closed(e: WireError) -> anyhow::Error {
    match e {
        WireError::Closed => anyhow::anyhow!("QEMU closed the QMP connection (did it exit?)"),
        e => anyhow::anyhow!("QMP: {e}"),
    }
}
