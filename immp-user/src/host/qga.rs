//! A client of qemu-guest-agent (QGA) over its host-side socket (the virtio-serial port
//! `org.qemu.guest_agent.0`): resynchronisation, `guest-info`, `guest-exec` and
//! `guest-exec-status`. No network port into the guest: everything goes through the port QEMU
//! already gives the agent.
use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize, de::DeserializeOwned};

use super::{
    qmp::{ErrorBody, Request, bad_socket},
    wire::{Conn, WireError, show},
};

/// The agent's replies (and, on a socket that is QMP's, QEMU's greeting).
#[derive(Deserialize)]
struct Reply {
    #[serde(rename = "return")]
    ret: Option<serde_json::Value>,
    error: Option<ErrorBody>,
    #[serde(rename = "QMP")]
    greeting: Option<serde::de::IgnoredAny>,
}

#[derive(Serialize)]
struct SyncArgs {
    id: u64,
}

#[derive(Deserialize)]
pub struct GuestInfo {
    pub version: String,
    pub supported_commands: Vec<CommandInfo>,
}

#[derive(Deserialize)]
pub struct CommandInfo {
    pub name: String,
    pub enabled: bool,
}

#[derive(Serialize)]
struct ExecArgs<'a> {
    path: &'a str,
    arg: &'a [String],
    #[serde(rename = "capture-output")]
    capture_output: bool,
}

#[derive(Deserialize)]
struct ExecPid {
    pid: i64,
}

#[derive(Serialize)]
struct StatusArgs {
    pid: i64,
}

/// `guest-exec-status`: output only once the process has exited (base64).
#[derive(Deserialize, Debug, Default)]
pub struct ExecStatus {
    pub exited: bool,
    pub exitcode: Option<i64>,
    pub signal: Option<i64>,
    #[serde(rename = "out-data")]
    pub out_data: Option<String>,
    #[serde(rename = "err-data")]
    pub err_data: Option<String>,
    #[serde(rename = "out-truncated", default)]
    pub out_truncated: bool,
}

impl ExecStatus {
    pub fn stdout(&self) -> String {
        decode_text(self.out_data.as_deref())
    }

    pub fn stderr(&self) -> String {
        decode_text(self.err_data.as_deref())
    }

    pub fn success(&self) -> bool {
        self.exited && self.exitcode == Some(0)
    }
}

pub struct Qga {
    conn: Conn,
    timeout: Duration,
    what: String,
    next_id: u64,
}

impl Qga {
    /// Connects and resynchronises. A missing socket or one speaking something else is bad
    /// input (exit 2); silence means no agent runs in the guest (exit 3).
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let what = format!("guest agent socket {}", path.display());
        let conn = Conn::connect(path).map_err(|e| bad_socket(&what, &e))?;
        // Different ids per run: a reply to an earlier client's sync is never taken for ours.
        let next_id = std::process::id() as u64 * 1000
            + std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_millis() as u64);
        let mut q = Self {
            conn,
            timeout,
            what,
            next_id,
        };
        q.sync()?;
        Ok(q)
    }

    /// `guest-sync-delimited`: a 0xFF byte first makes the agent drop any half-read request,
    /// its reply comes after a 0xFF byte, and replies left over from an earlier client are
    /// skipped until ours (same id) arrives.
    pub fn sync(&mut self) -> anyhow::Result<()> {
        self.next_id += 1;
        let id = self.next_id;
        let req = Request {
            execute: "guest-sync-delimited",
            arguments: Some(SyncArgs { id }),
        };
        self.conn.send_raw(&[0xff]).map_err(|e| self.lost(e))?;
        self.conn.send(&req).map_err(|e| self.lost(e))?;
        let deadline = Instant::now() + self.timeout;
        loop {
            let Some(line) = self.conn.read_line(deadline).map_err(|e| self.lost(e))? else {
                return Err(crate::environment(format!(
                    "the {} did not answer within {:?}: is qemu-ga running in the guest?",
                    self.what, self.timeout
                )));
            };
            let body: Vec<u8> = line.iter().copied().skip_while(|&b| b == 0xff).collect();
            if body.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<Reply>(&body) {
                Ok(Reply {
                    greeting: Some(_), ..
                }) => {
                    return Err(crate::usage(format!(
                        "{} is a QMP socket, not a guest agent's",
                        self.what
                    )));
                }
                Ok(Reply { ret: Some(v), .. }) if v.as_u64() == Some(id) => return Ok(()),
                // An error for the flush byte, or a stale reply: keep reading.
                Ok(_) => {}
                Err(_) => {
                    return Err(crate::usage(format!(
                        "{} does not speak the guest agent protocol: it sent {}",
                        self.what,
                        show(&line)
                    )));
                }
            }
        }
    }

    fn lost(&self, e: WireError) -> anyhow::Error {
        match e {
            WireError::Closed => anyhow::anyhow!("the {} closed the connection", self.what),
            e => anyhow::anyhow!("the {}: {e}", self.what),
        }
    }

    /// Runs one agent command and returns its typed reply.
    pub fn execute<A: Serialize, R: DeserializeOwned>(
        &mut self,
        name: &str,
        arguments: Option<A>,
    ) -> anyhow::Result<R> {
        let req = Request {
            execute: name,
            arguments,
        };
        self.conn.send(&req).map_err(|e| self.lost(e))?;
        let deadline = Instant::now() + self.timeout;
        let line = self
            .conn
            .read_line(deadline)
            .map_err(|e| self.lost(e))?
            .ok_or_else(|| {
                crate::environment(format!(
                    "the {} did not answer {name} within {:?}",
                    self.what, self.timeout
                ))
            })?;
        let body: Vec<u8> = line.iter().copied().skip_while(|&b| b == 0xff).collect();
        let reply: Reply = serde_json::from_slice(&body)
            .with_context(|| format!("the {} sent {} to {name}", self.what, show(&line)))?;
        if let Some(e) = reply.error {
            anyhow::bail!("{name}: {}", e.desc);
        }
        serde_json::from_value(reply.ret.unwrap_or(serde_json::Value::Null))
            .with_context(|| format!("{name}: unexpected reply from the guest agent"))
    }

    pub fn info(&mut self) -> anyhow::Result<GuestInfo> {
        self.execute::<(), _>("guest-info", None)
    }

    /// Starts `path args` in the guest (output captured); returns the guest's PID.
    pub fn exec(&mut self, path: &str, args: &[String]) -> anyhow::Result<i64> {
        let a = ExecArgs {
            path,
            arg: args,
            capture_output: true,
        };
        let p: ExecPid = self.execute("guest-exec", Some(a))?;
        Ok(p.pid)
    }

    pub fn status(&mut self, pid: i64) -> anyhow::Result<ExecStatus> {
        self.execute("guest-exec-status", Some(StatusArgs { pid }))
    }

    /// Polls until `pid` exits or `wait` passes (then `exited` is false).
    pub fn wait(&mut self, pid: i64, wait: Duration) -> anyhow::Result<ExecStatus> {
        let deadline = Instant::now() + wait;
        loop {
            let st = self.status(pid)?;
            if st.exited || Instant::now() >= deadline {
                return Ok(st);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs a command in the guest to its end (at most the agent timeout).
    pub fn run(&mut self, path: &str, args: &[String]) -> anyhow::Result<ExecStatus> {
        let pid = self.exec(path, args)?;
        let st = self.wait(pid, self.timeout)?;
        if !st.exited {
            anyhow::bail!(
                "`{path} {}` did not finish in the guest within {:?}",
                args.join(" "),
                self.timeout
            );
        }
        Ok(st)
    }
}

/// Standard base64 (with or without padding) to text; what is not base64 is dropped.
pub fn decode_text(b64: Option<&str>) -> String {
    let Some(s) = b64 else {
        return String::new();
    };
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let (mut out, mut acc, mut bits) = (Vec::with_capacity(s.len() * 3 / 4), 0u32, 0u32);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | v as u32;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::decode_text;

    #[test]
    fn base64_round_trips_what_the_agent_sends() {
        assert_eq!(decode_text(Some("aW1tcCAwLjEuMAo=")), "immp 0.1.0\n");
        assert_eq!(decode_text(Some("YQ==")), "a");
        assert_eq!(decode_text(Some("YWI=")), "ab");
        assert_eq!(decode_text(Some("YWJj")), "abc");
        assert_eq!(decode_text(None), "");
    }
}
